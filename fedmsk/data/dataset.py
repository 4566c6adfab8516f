"""Torch datasets and loaders over one site's manifest.

Everything that can go wrong with a file is found when the loaders are built, not during a
federated round: every image is passed through the preprocessing cache at construction, which
decodes it once (filling the cache) and collects each failure as an :class:`ImageReadError`.
Failed images are logged here with their file name (the log stays on the node) and left out;
only their count and error type names may be reported upstream.

Split source: the manifest's ``split`` column where filled, otherwise :func:`assign_splits` with
``DataConfig.split_ratios`` and ``split_seed`` (patient-grouped, stratified). Splits are assigned
before any image is decoded, so a repaired or newly broken file never moves other patients.
Rows that cannot be used are dropped the same way ``fedmsk data check`` drops them: unknown
split values, patients already in two splits, labels outside the task, views outside the task,
and exact duplicate files (the first copy is kept).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from fedmsk.config import DataConfig, TaskConfig, TrainConfig
from fedmsk.data.augment import SeededAugment, worker_init_fn
from fedmsk.data.cache import PreprocessCache, PreprocessParams, default_cache_dir, to_float
from fedmsk.data.errors import ImageReadError
from fedmsk.data.intensity import InputNorm
from fedmsk.data.loader_settings import IN_PROCESS, LoaderSettings, resolve_loader_settings
from fedmsk.data.manifest import ManifestRow, manifest_path, read_manifest
from fedmsk.data.splits import assign_splits, find_split_issues
from fedmsk.data.validated_index import index_path, load_index, save_index

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SiteItem:
    """One usable image: where it is, its class index, its patient and its content hash."""

    path: Path
    label: int
    patient_id: str
    digest: str
    view: str = ""


class SiteDataset(Dataset):
    """(float32 tensor C x H x W, int label) pairs read from the preprocessing cache.

    Build it with :meth:`from_rows`, which validates every image and records failures in
    ``skipped``. Patient identifiers are available through :meth:`patient_ids` for
    patient-level evaluation on the node; they must never be sent anywhere.
    """

    def __init__(
        self,
        items: list[SiteItem],
        cache: PreprocessCache,
        transform: Transform | None = None,
        skipped: list[ImageReadError] | None = None,
        norm: InputNorm | None = None,
    ) -> None:
        self.items = list(items)
        self.cache = cache
        self.transform = transform
        self.skipped = list(skipped or [])
        self.norm = norm or InputNorm()

    def with_transform(self, transform: Transform | None) -> SiteDataset:
        """The same validated images with another augmentation (a new seed each round)."""
        return SiteDataset(self.items, self.cache, transform, self.skipped, self.norm)

    def one_per_patient(self) -> SiteDataset:
        """One image per patient (the one whose content hash sorts first, so the choice is
        fixed across rounds and runs), augmentation kept: under patient-level DP a patient may
        be at most one record."""
        chosen: dict[str, SiteItem] = {}
        for item in self.items:
            kept = chosen.get(item.patient_id)
            if kept is None or item.digest < kept.digest:
                chosen[item.patient_id] = item
        items = [item for item in self.items if chosen[item.patient_id] is item]
        return SiteDataset(items, self.cache, self.transform, self.skipped, self.norm)

    def unaugmented(self, items: list[SiteItem] | None = None) -> SiteDataset:
        """The same images (or ``items`` read through the same cache) without augmentation,
        with the same input normalisation: what evaluation and statistics passes read."""
        chosen = self.items if items is None else items
        return SiteDataset(chosen, self.cache, transform=None, norm=self.norm)

    def as_read(self) -> SiteDataset:
        """The same images unaugmented and before input normalisation, in the same order: what
        a person looks at under a heatmap. After local contrast normalisation the model reads
        edges on flat grey, which is not the radiograph a reader knows."""
        return SiteDataset(self.items, self.cache, transform=None, norm=InputNorm())

    @classmethod
    def from_rows(
        cls,
        site_dir: Path,
        rows: list[ManifestRow],
        classes: list[str],
        cache: PreprocessCache,
        transform: Transform | None = None,
        norm: InputNorm | None = None,
    ) -> SiteDataset:
        """Validate ``rows`` through ``cache``; unreadable images are skipped and collected."""
        items: list[SiteItem] = []
        skipped: list[ImageReadError] = []
        for row in rows:
            path = Path(site_dir) / row.image
            try:
                digest = cache.content_hash(path)
                cache.get(path, digest)
            except ImageReadError as exc:
                log.warning("skipping unreadable image %s", exc)
                skipped.append(exc)
                continue
            label = classes.index(row.label)
            items.append(SiteItem(path, label, row.patient_id, digest, row.view))
        return cls(items, cache, transform, skipped, norm)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.items)):
            item = self.items[(index + offset) % len(self.items)]
            try:
                array = self.cache.get(item.path, item.digest)
            except ImageReadError as exc:
                # Validated at construction; a cache entry lost since then whose source also
                # broke costs this one sample, never the round.
                log.warning("image became unreadable during training, substituting: %s", exc)
                continue
            tensor = torch.from_numpy(to_float(array))
            if self.transform is not None:
                tensor = self.transform(tensor)
            return self.norm(tensor), item.label
        raise IndexError("no readable image left in this dataset")

    def labels(self) -> list[int]:
        return [item.label for item in self.items]

    def patient_ids(self) -> list[str]:
        """Patient id per item, aligned with indices; for patient-level metrics on the node."""
        return [item.patient_id for item in self.items]

    def patient_keys(self) -> list[str]:
        """Opaque per-dataset patient keys (``"p0"``, ``"p1"``...), aligned with indices.

        Groups items exactly like :meth:`patient_ids` but carries no identifier, for code that
        only needs to know which items belong together.
        """
        codes: dict[str, str] = {}
        return [codes.setdefault(pid, f"p{len(codes)}") for pid in self.patient_ids()]

    def class_counts(self, num_classes: int) -> list[int]:
        counts = np.bincount(np.asarray(self.labels(), dtype=np.int64), minlength=num_classes)
        return [int(c) for c in counts]


@dataclass
class SiteLoaders:
    """The loaders of one site; ``counts`` is split -> class name -> number of images."""

    train: DataLoader | None
    val: DataLoader | None
    test: DataLoader | None
    counts: dict[str, dict[str, int]]
    skipped: list[ImageReadError] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)

    def dataset(self, split: str) -> SiteDataset | None:
        loader = getattr(self, split)
        return None if loader is None else loader.dataset


def select_rows(
    rows: list[ManifestRow], task: TaskConfig, ratios: list[float], seed: int
) -> tuple[list[ManifestRow], dict[str, int]]:
    """Rows with a split that this task can use, and how many were dropped for what reason."""
    kept, issues = find_split_issues(rows)
    dropped: dict[str, int] = {}
    for issue in issues:
        dropped[issue.kind] = dropped.get(issue.kind, 0) + len(issue.images)
        log.warning("leaving out %s: %s", ", ".join(issue.images[:5]), issue.detail)
    assigned = assign_splits(kept, ratios, seed)
    usable = []
    for row in assigned:
        reason = None
        if row.label not in task.classes:
            reason = "unknown_label"
        elif task.views and row.view and row.view not in task.views:
            reason = "other_view"
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            log.warning("leaving out %s (%s)", row.image, reason)
        else:
            usable.append(row)
    return usable, dropped


def _drop_duplicates(datasets: dict[str, SiteDataset], order: tuple[str, ...]) -> int:
    """Keep the first copy of identical files (train first) so no image sits in two splits."""
    seen: set[str] = set()
    removed = 0
    for split in order:
        ds = datasets[split]
        unique = []
        for item in ds.items:
            if item.digest in seen:
                log.warning("leaving out %s: identical to an earlier file", item.path)
                removed += 1
                continue
            seen.add(item.digest)
            unique.append(item)
        ds.items = unique
    return removed


def _make_loader(
    dataset: SiteDataset,
    batch_size: int,
    settings: LoaderSettings = IN_PROCESS,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    balanced: bool = False,
    num_classes: int = 2,
) -> DataLoader | None:
    if len(dataset) == 0:
        return None
    sampler = None
    if balanced:
        counts = dataset.class_counts(num_classes)
        weights = torch.tensor([1.0 / counts[label] for label in dataset.labels()])
        sampler = WeightedRandomSampler(
            weights, num_samples=len(dataset), replacement=True, generator=generator
        )
        shuffle = False
    # A training epoch never ends on a 1-2 image batch: it breaks BatchNorm ("more than 1 value
    # per channel") or gives a few images a whole step's weight. Each pass reshuffles, so no
    # image is left out for good. A site smaller than one batch keeps its only batch.
    drop_last = (shuffle or balanced) and len(dataset) > batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=drop_last,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        worker_init_fn=worker_init_fn if settings.num_workers > 0 else None,
        **settings.loader_kwargs(),
    )


@dataclass
class SiteDatasets:
    """A site's validated train/val/test datasets: the costly part of building its loaders
    (every image is hashed and its cached array read once), kept by a :class:`DatasetPool`."""

    datasets: dict[str, SiteDataset]
    skipped: list[ImageReadError]
    dropped: dict[str, int]


def build_site_datasets(
    site_dir: Path, task: TaskConfig, data: DataConfig, train: TrainConfig
) -> SiteDatasets:
    """Validate a site's manifest rows through its preprocessing cache, split by patient."""
    site_dir = Path(site_dir)
    params = PreprocessParams(data.image_size, data.in_chans, str(data.frame))
    cache = PreprocessCache(default_cache_dir(site_dir, data.cache_dir), params)
    order = ("train", "val", "test")
    index = index_path(
        cache, [str(site_dir.resolve()), params.key(), _datasets_key(site_dir, task, data)]
    )
    remembered = load_index(index, site_dir, cache)
    if remembered is not None:
        splits, dropped = remembered
        datasets = {
            split: SiteDataset(
                [_item_from_index(site_dir, row) for row in splits.get(split, [])],
                cache,
                None,
                [],
                InputNorm.from_config(data),
            )
            for split in order
        }
        return SiteDatasets(datasets, [], dropped)
    rows, dropped = select_rows(
        read_manifest(site_dir), task, list(data.split_ratios), data.split_seed
    )
    datasets: dict[str, SiteDataset] = {}
    skipped: list[ImageReadError] = []
    for split in order:
        split_rows = [r for r in rows if r.split == split]
        datasets[split] = SiteDataset.from_rows(
            site_dir, split_rows, task.classes, cache, None, InputNorm.from_config(data)
        )
        skipped.extend(datasets[split].skipped)
    duplicates = _drop_duplicates(datasets, order)
    if duplicates:
        dropped["duplicate_content"] = duplicates
    if skipped:
        dropped["unreadable_image"] = len(skipped)
    else:  # a site with unreadable images validates in full, and reports them, every time
        with contextlib.suppress(ValueError):  # an image outside the site folder: not indexed
            rows_by_split = {
                split: [_item_to_index(site_dir, i) for i in datasets[split].items]
                for split in order
            }
            save_index(index, site_dir, rows_by_split, dropped)
    return SiteDatasets(datasets, skipped, dropped)


def _item_to_index(site_dir: Path, item: SiteItem) -> dict[str, Any]:
    return {
        "image": item.path.relative_to(site_dir).as_posix(),
        "label": item.label,
        "patient_id": item.patient_id,
        "digest": item.digest,
        "view": item.view,
    }


def _item_from_index(site_dir: Path, row: dict[str, Any]) -> SiteItem:
    return SiteItem(
        site_dir / str(row["image"]),
        int(row["label"]),
        str(row["patient_id"]),
        str(row["digest"]),
        str(row["view"]),
    )


class DatasetPool:
    """Validated datasets kept for the life of a node process, so a message does not re-read
    every image of the site: its cost no longer grows with the data set. Rebuilt when the
    manifest file or a setting that shapes the datasets changes; one entry per site."""

    def __init__(self) -> None:
        self._entries: dict[Path, tuple[tuple[Any, ...], SiteDatasets]] = {}

    def get(
        self, site_dir: Path, task: TaskConfig, data: DataConfig, train: TrainConfig
    ) -> SiteDatasets:
        site_dir = Path(site_dir).resolve()
        # the normalisation is baked into the datasets, not into the validated index
        key = (*_datasets_key(site_dir, task, data), InputNorm.from_config(data))
        entry = self._entries.get(site_dir)
        if entry is None or entry[0] != key:
            entry = (key, build_site_datasets(site_dir, task, data, train))
            self._entries[site_dir] = entry
        return entry[1]


def _datasets_key(site_dir: Path, task: TaskConfig, data: DataConfig) -> tuple[Any, ...]:
    manifest = manifest_path(site_dir)
    stat = manifest.stat() if manifest.is_file() else None
    return (
        (stat.st_mtime_ns, stat.st_size) if stat else None,
        tuple(task.classes),
        tuple(task.views or ()),
        data.image_size,
        data.in_chans,
        str(data.frame),
        tuple(data.split_ratios),
        data.split_seed,
        data.standardize,
        data.cache_dir,
    )


def training_loader_settings(data: DataConfig, train: TrainConfig) -> LoaderSettings:
    """``data.num_workers`` resolved for the device ``train.device`` names (see
    :mod:`fedmsk.data.loader_settings`)."""
    from fedmsk.training import resolve_device

    return resolve_loader_settings(data.num_workers, resolve_device(train.device).type)


def build_site_loaders(
    site_dir: Path,
    task: TaskConfig,
    data: DataConfig,
    train: TrainConfig,
    seed: int,
    pool: DatasetPool | None = None,
    one_image_per_patient: bool = False,
) -> SiteLoaders:
    """Loaders for one site's train/val/test splits (``None`` where a split is empty).

    ``one_image_per_patient`` keeps one training image per patient (patient-level DP).

    ``train`` is shuffled with a generator seeded by ``seed`` (or class-balanced by a
    WeightedRandomSampler when ``train.class_weighting == "sampler"``) and augmented when
    ``data.augment``; ``val`` and ``test`` are in manifest order, unaugmented. With ``pool``
    the validated datasets are reused across calls; the loaders and augmentation are new.
    """
    built = (
        pool.get(site_dir, task, data, train)
        if pool is not None
        else build_site_datasets(site_dir, task, data, train)
    )
    order = ("train", "val", "test")
    datasets = dict(built.datasets)
    if one_image_per_patient and datasets["train"] is not None:
        datasets["train"] = datasets["train"].one_per_patient()
    if data.augment and datasets["train"] is not None:
        datasets["train"] = datasets["train"].with_transform(
            SeededAugment(data.augmentation, seed=seed)
        )
    generator = torch.Generator().manual_seed(seed)
    # Only the training split is augmented and read every round; validation and test are
    # read in order from cached arrays, which needs no worker.
    settings = training_loader_settings(data, train)
    loaders = {
        split: _make_loader(
            datasets[split],
            train.batch_size,
            settings if split == "train" else IN_PROCESS,
            generator=generator if split == "train" else None,
            shuffle=split == "train",
            balanced=split == "train" and train.class_weighting == "sampler",
            num_classes=task.num_classes,
        )
        for split in order
    }
    counts = {
        split: dict(zip(task.classes, datasets[split].class_counts(task.num_classes), strict=True))
        for split in order
    }
    return SiteLoaders(
        loaders["train"], loaders["val"], loaders["test"], counts, built.skipped, built.dropped
    )
