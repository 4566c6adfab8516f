"""SiteDataset, the preprocessing cache, loaders and augmentation on tiny synthetic sites."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import WeightedRandomSampler

import fedmsk.data.cache as cache_module
from fedmsk.config import DataConfig, TaskConfig, TrainConfig
from fedmsk.data.augment import AugmentConfig, SeededAugment, static_augment
from fedmsk.data.cache import PreprocessCache, PreprocessParams, preprocess
from fedmsk.data.dataset import DatasetPool, build_site_loaders
from fedmsk.data.dicom_write import write_dicom
from fedmsk.data.errors import ImageReadError
from fedmsk.data.images import load_image
from fedmsk.data.manifest import ManifestRow, read_manifest, write_manifest

torch.set_num_threads(1)

TASK = TaskConfig(name="t", classes=["normal", "fracture"], positive_class="fracture")


def _png(path: Path, seed: int, shape: tuple[int, ...] = (24, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _site(root: Path, patients: int = 20, fracture_every: int = 3) -> Path:
    """``patients`` patients with two PNGs each (one RGB), plus one DICOM."""
    site = root / "site"
    rows = []
    for p in range(patients):
        label = "fracture" if p % fracture_every == 0 else "normal"
        for k in range(2):
            name = f"images/p{p}_{k}.png"
            _png(site / name, p * 10 + k, (24, 40, 3) if k else (24, 40))
            rows.append(ManifestRow(name, label, f"PID{p:03d}"))
    write_dicom(site / "images/x.dcm", np.arange(600, dtype=np.uint16).reshape(20, 30) * 6)
    rows.append(ManifestRow("images/x.dcm", "normal", "PID999"))
    write_manifest(site, rows)
    return site


class CountingDecoder:
    """Counts real decodes; installed in place of load_image."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path: Path, frame: str = "0"):  # type: ignore[no-untyped-def]
        self.paths.append(Path(path).name)
        return load_image(path, frame=frame)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> CountingDecoder:
    counter = CountingDecoder()
    monkeypatch.setattr(cache_module, "load_image", counter)
    return counter


def _data(**kw) -> DataConfig:  # type: ignore[no-untyped-def]
    base = dict(
        image_size=32, in_chans=3, augment=True, num_workers=0, split_ratios=[0.6, 0.2, 0.2]
    )
    base.update(kw)
    return DataConfig(**base)


def test_shapes_dtype_counts_and_patient_grouping(tmp_path: Path, decodes: CountingDecoder) -> None:
    site = _site(tmp_path)
    loaders = build_site_loaders(site, TASK, _data(), TrainConfig(batch_size=4), seed=0)
    images, labels = next(iter(loaders.train))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    total = sum(sum(per.values()) for per in loaders.counts.values())
    assert total == 41 and loaders.skipped == []
    assert set(loaders.counts) == {"train", "val", "test"}
    assert all(set(per) == {"normal", "fracture"} for per in loaders.counts.values())
    patients = {}
    for split in ("train", "val", "test"):
        dataset = loaders.dataset(split)
        assert dataset is not None and len(dataset) == sum(loaders.counts[split].values())
        assert len(dataset.patient_ids()) == len(dataset)
        keys = dataset.patient_keys()
        assert len(set(keys)) == len(set(dataset.patient_ids())) and "PID" not in "".join(keys)
        for pid in dataset.patient_ids():
            assert patients.setdefault(pid, split) == split
    assert len(decodes.paths) == 41  # every image decoded once, at construction


def test_second_build_and_epochs_hit_the_cache(tmp_path: Path, decodes: CountingDecoder) -> None:
    site = _site(tmp_path, patients=6)
    data, train = _data(), TrainConfig(batch_size=8)
    loaders = build_site_loaders(site, TASK, data, train, seed=0)
    assert len(decodes.paths) == 13
    for _ in range(2):
        for _batch in loaders.train:
            pass
    again = build_site_loaders(site, TASK, data, train, seed=0)
    for _batch in again.test:
        pass
    assert len(decodes.paths) == 13
    assert (site / ".fedmsk-cache").is_dir()


def test_changed_file_and_changed_parameters_invalidate(
    tmp_path: Path, decodes: CountingDecoder
) -> None:
    site = _site(tmp_path, patients=4)
    build_site_loaders(site, TASK, _data(), TrainConfig(), seed=0)
    assert len(decodes.paths) == 9
    _png(site / "images/p2_0.png", seed=12345)
    build_site_loaders(site, TASK, _data(), TrainConfig(), seed=0)
    assert decodes.paths[9:] == ["p2_0.png"]
    build_site_loaders(site, TASK, _data(image_size=48), TrainConfig(), seed=0)
    assert len(decodes.paths) == 19
    build_site_loaders(site, TASK, _data(in_chans=1), TrainConfig(), seed=0)
    assert len(decodes.paths) == 28
    other = tmp_path / "shared-cache"
    build_site_loaders(site, TASK, _data(cache_dir=str(other)), TrainConfig(), seed=0)
    assert len(decodes.paths) == 37 and any(other.rglob("*.npy"))


def test_cached_array_matches_a_fresh_decode(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=2)
    params = PreprocessParams(image_size=32, in_chans=1)
    cache = PreprocessCache(tmp_path / "c", params)
    path = site / "images/p1_1.png"
    first = cache.get(path)
    assert first.dtype == np.float16 and first.shape == (1, 32, 32)
    assert np.array_equal(cache.get(path), first) and cache.stats.decodes == 1
    fresh = preprocess(load_image(path).pixels, params)
    assert np.array_equal(fresh, first)
    as_uint8 = PreprocessCache(tmp_path / "c", PreprocessParams(32, 1, dtype="uint8")).get(path)
    assert as_uint8.dtype == np.uint8
    assert np.abs(as_uint8 / 255.0 - first.astype(np.float32)).max() < 3e-3


def test_aspect_ratio_is_kept_by_black_padding() -> None:
    wide = np.ones((10, 40, 1), dtype=np.float32)
    out = preprocess(wide, PreprocessParams(image_size=40, in_chans=1)).astype(np.float32)
    assert out.shape == (1, 40, 40)
    assert out[0, :14].max() == 0 and out[0, 26:].max() == 0  # bands above and below
    assert out[0, 16:24].min() == 1.0


def test_corrupt_and_missing_files_are_skipped_and_reported(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=6)
    (site / "images/p1_0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (site / "images/p2_1.png").unlink()
    loaders = build_site_loaders(site, TASK, _data(), TrainConfig(batch_size=4), seed=0)
    names = sorted(Path(err.path).name for err in loaders.skipped)
    assert names == ["p1_0.png", "p2_1.png"]
    assert all(isinstance(err, ImageReadError) for err in loaders.skipped)
    assert sum(sum(per.values()) for per in loaders.counts.values()) == 11
    assert loaders.dropped["unreadable_image"] == 2
    held = sum(
        len(loader.dataset) for loader in (loaders.train, loaders.val, loaders.test) if loader
    )
    assert held == 11
    # a training pass never ends on a partial batch (drop_last); each pass reshuffles
    assert all(len(labels) == 4 for _, labels in loaders.train)


def test_manifest_split_column_is_used_and_empty_split_is_none(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=4)
    rows = [
        ManifestRow(
            r.image, r.label, r.patient_id, split="test" if r.patient_id == "PID001" else "train"
        )
        for r in read_manifest(site)
    ]
    write_manifest(site, rows)
    loaders = build_site_loaders(site, TASK, _data(), TrainConfig(), seed=0)
    assert loaders.val is None
    assert set(loaders.test.dataset.patient_ids()) == {"PID001"}
    assert sum(loaders.counts["val"].values()) == 0


def test_duplicates_unknown_labels_and_split_conflicts_are_left_out(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=4)
    rows = read_manifest(site)
    (site / "images/dup.png").write_bytes((site / "images/p0_0.png").read_bytes())
    rows += [
        ManifestRow("images/dup.png", "normal", "OTHER"),
        ManifestRow("images/p3_0.png", "dislocation", "PIDX"),
        ManifestRow("images/p1_0.png", "normal", "PIDC", split="train"),
        ManifestRow("images/p1_1.png", "normal", "PIDC", split="test"),
    ]
    write_manifest(site, rows)
    loaders = build_site_loaders(site, TASK, _data(), TrainConfig(), seed=0)
    assert loaders.dropped == {
        "patient_in_two_splits": 2,
        "unknown_label": 1,
        "duplicate_content": 1,
    }
    assert sum(sum(per.values()) for per in loaders.counts.values()) == 9


def test_seeded_shuffle_and_augmentation_are_reproducible(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=8)
    train = TrainConfig(batch_size=6)
    first = next(iter(build_site_loaders(site, TASK, _data(), train, seed=3).train))
    again = next(iter(build_site_loaders(site, TASK, _data(), train, seed=3).train))
    other = next(iter(build_site_loaders(site, TASK, _data(), train, seed=4).train))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    plain = build_site_loaders(site, TASK, _data(augment=False), train, seed=3)
    x, _ = plain.test.dataset[0]
    y, _ = plain.test.dataset[0]
    assert torch.equal(x, y)


def test_augmentation_changes_images_but_keeps_shape_and_range() -> None:
    image = torch.rand(1, 32, 32)
    augment = SeededAugment(AugmentConfig(hflip=True), seed=0)
    outs = [augment(image) for _ in range(5)]
    assert all(o.shape == image.shape and o.min() >= 0 and o.max() <= 1 for o in outs)
    assert not torch.equal(outs[0], outs[1])
    flip_only = SeededAugment(
        AugmentConfig(
            crop_scale=(1, 1),
            crop_ratio=(1, 1),
            rotation_degrees=0,
            brightness=0,
            contrast=0,
            hflip=True,
        ),
        seed=1,
    )
    flips = [torch.equal(flip_only(image), image.flip(-1)) for _ in range(40)]
    assert 5 < sum(flips) < 35


def _intensity_only(**ranges: list[float]) -> AugmentConfig:
    return AugmentConfig(
        crop_scale=[1, 1],
        crop_ratio=[1, 1],
        rotation_degrees=0,
        brightness=0,
        contrast=0,
        hflip=False,
        **ranges,
    )


def test_gamma_blur_and_noise_augmentation_do_what_they_say() -> None:
    """Each intensity transform alone: gamma bends the curve (monotone, ends fixed), blur
    smooths, noise adds roughly the asked spread; all stay in [0, 1]."""
    ramp = torch.linspace(0, 1, 64).repeat(64, 1).unsqueeze(0)
    gamma = SeededAugment(_intensity_only(gamma=[0.5, 2.0]), seed=0)
    curves = [gamma(ramp) for _ in range(8)]
    assert all(torch.all(c[..., 1:] >= c[..., :-1]) for c in curves)
    assert all(abs(float(c[0, 0, -1]) - 1.0) < 1e-6 and float(c[0, 0, 0]) == 0 for c in curves)
    mids = [float(c[0, 0, 32]) for c in curves]
    assert max(mids) - min(mids) > 0.1  # different gammas were drawn
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()[None]
    blurred = SeededAugment(_intensity_only(blur_sigma=[0.8, 1.0]), seed=0)(checker)
    assert float(blurred.std()) < 0.2 * float(checker.std())
    flat = torch.full((1, 64, 64), 0.5)
    noisy = SeededAugment(_intensity_only(noise_std=[0.04, 0.05]), seed=0)(flat)
    assert 0.035 < float(noisy.std()) < 0.055 and 0 <= float(noisy.min()) <= float(noisy.max()) <= 1


def test_intensity_augmentation_off_by_default_keeps_the_random_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A switched-off transform draws nothing (a switched-on one draws once), so runs made
    before gamma, blur and noise existed reproduce with the default config."""
    calls = 0
    original = SeededAugment._uniform

    def counting(self: SeededAugment, low: float, high: float) -> float:
        nonlocal calls
        calls += 1
        return original(self, low, high)

    monkeypatch.setattr(SeededAugment, "_uniform", counting)
    image = torch.rand(1, 32, 32)

    def draws(config: AugmentConfig) -> int:
        nonlocal calls
        calls = 0
        SeededAugment(config, seed=7)(image)
        return calls

    off = draws(_intensity_only())
    assert draws(_intensity_only(gamma=[0.7, 1.5])) == off + 1
    assert draws(_intensity_only(blur_sigma=[0.0, 1.0])) == off + 1
    assert draws(_intensity_only(noise_std=[0.0, 0.05])) == off + 1
    assert AugmentConfig().gamma == [1.0, 1.0]  # a default that changes is a new recipe


def test_augmentation_ranges_come_from_the_hydra_config(tmp_path: Path) -> None:
    from fedmsk.config import compose

    cfg = compose(["data.augmentation.gamma=[0.7,1.5]", "data.augmentation.noise_std=[0,0.05]"])
    assert cfg.data.augmentation.gamma == [0.7, 1.5]
    assert cfg.data.augmentation.noise_std == [0, 0.05]
    site = _site(tmp_path, patients=8)
    data = _data(augmentation=cfg.data.augmentation)
    loaders = build_site_loaders(site, TASK, data, TrainConfig(batch_size=4), seed=0)
    assert loaders.train.dataset.transform.config.gamma == [0.7, 1.5]


def test_sampler_balances_classes(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=20, fracture_every=5)  # 20 % fracture
    loaders = build_site_loaders(
        site,
        TASK,
        _data(augment=False, image_size=16),
        TrainConfig(batch_size=64, class_weighting="sampler"),
        seed=0,
    )
    assert isinstance(loaders.train.sampler, WeightedRandomSampler)
    drawn = Counter()
    for _ in range(10):
        for _, labels in loaders.train:
            drawn.update(labels.tolist())
    assert drawn[1] / (drawn[0] + drawn[1]) == pytest.approx(0.5, abs=0.08)


def test_two_fillers_share_one_cache_safely(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=6)
    paths = sorted((site / "images").glob("*.png"))
    params = PreprocessParams(image_size=32, in_chans=1)
    results: list[list[np.ndarray]] = [[], []]
    errors: list[BaseException] = []

    def fill(slot: int) -> None:
        try:
            cache = PreprocessCache(tmp_path / "shared", params)
            results[slot] = [cache.get(p) for p in paths]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fill, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(np.array_equal(a, b) for a, b in zip(*results, strict=True))
    assert not [p for p in (tmp_path / "shared").rglob(".tmp-*")]
    assert len(list((tmp_path / "shared").rglob("*.npy"))) == len(paths)


def test_static_augment_adds_training_copies_only(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=10)
    written = static_augment(site, copies=2, seed=0, ratios=[0.6, 0.2, 0.2])
    rows = read_manifest(site)
    originals = [r for r in rows if not r.image.startswith("augmented/")]
    copies = [r for r in rows if r.image.startswith("augmented/")]
    train_originals = [r for r in originals if r.split == "train"]
    assert written == len(copies) == 2 * len(train_originals) > 0
    assert all(r.split for r in originals) and {r.split for r in copies} == {"train"}
    assert all((site / r.image).is_file() for r in copies)
    split_of = {}
    for row in rows:
        assert split_of.setdefault(row.patient_id, row.split) == row.split
    # running again replaces the copies instead of copying copies
    assert static_augment(site, copies=1, seed=0) == len(train_originals)
    assert len(read_manifest(site)) == len(originals) + len(train_originals)


def test_content_hash_memo_is_used_only_for_settled_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    from types import SimpleNamespace

    path = tmp_path / "a.png"
    _png(path, 1)
    hashed: list[Path] = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    cache = PreprocessCache(tmp_path / "c", PreprocessParams(16, 1))
    first = cache.content_hash(path)
    assert cache.content_hash(path) == first and len(hashed) == 2  # too fresh to memoise
    # an hour later the file has settled: its hash is remembered and reused
    monkeypatch.setattr(cache_module, "time", SimpleNamespace(time=lambda: time.time() + 3600))
    assert cache.content_hash(path) == first and len(hashed) == 3
    assert cache.content_hash(path) == first and len(hashed) == 3
    _png(path, 2)  # rewritten: new stat signature, so hashed again
    second = cache.content_hash(path)
    assert second != first and len(hashed) == 4


def test_standardized_images_have_zero_mean_and_unit_variance(tmp_path: Path) -> None:
    site = _site(tmp_path, patients=6)
    data = _data()
    data.standardize = True
    loaders = build_site_loaders(site, TASK, data, TrainConfig(batch_size=4), seed=0)
    train = loaders.dataset("train")
    assert train is not None and train.norm.standardize
    image, _ = train[0]
    assert abs(float(image.mean())) < 1e-4 and abs(float(image.std()) - 1.0) < 1e-3
    plain = train.unaugmented()
    assert plain.transform is None and plain.norm.standardize and plain.items == train.items
    again, _ = plain[0]
    assert torch.allclose(again, plain[0][0])  # unaugmented reads repeat exactly


def test_local_contrast_reaches_every_split_and_a_pool_rebuilds_when_it_changes(
    tmp_path: Path,
) -> None:
    site = _site(tmp_path, patients=6)
    data = _data()
    pool = DatasetPool()
    plain = pool.get(site, TASK, data, TrainConfig()).datasets["val"]
    data.local_contrast = 3.0
    normalised = pool.get(site, TASK, data, TrainConfig()).datasets["val"]
    assert plain is not None and normalised is not None
    assert plain.norm.local_contrast == 0 and normalised.norm.local_contrast == 3.0
    raw, _ = plain[0]
    image, _ = normalised[0]
    assert float(raw.min()) >= 0.0 and float(image.min()) < 0.0  # deviations from the local mean
    shown, _ = normalised.as_read()[0]  # what a heatmap is drawn over: the image as read
    assert torch.equal(shown, raw) and normalised.as_read().norm.local_contrast == 0
    loaders = build_site_loaders(site, TASK, data, TrainConfig(batch_size=4), seed=0)
    for split in ("train", "val", "test"):
        dataset = loaders.dataset(split)
        assert dataset is not None and dataset.norm.local_contrast == 3.0
    train = loaders.dataset("train")
    assert train is not None and train.unaugmented().norm == train.norm


def test_a_dataset_pool_validates_a_site_once_and_gives_the_same_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node process answers many messages: the images are validated on the first only."""
    from fedmsk.data import dataset as dataset_module
    from fedmsk.data.dataset import DatasetPool

    site = _site(tmp_path, patients=8)
    train = TrainConfig(batch_size=6)
    validated: list[int] = []
    original = dataset_module.SiteDataset.from_rows.__func__

    def counting(cls, site_dir, rows, *args, **kwargs):  # type: ignore[no-untyped-def]
        validated.append(len(rows))
        return original(cls, site_dir, rows, *args, **kwargs)

    monkeypatch.setattr(dataset_module.SiteDataset, "from_rows", classmethod(counting))
    pool = DatasetPool()
    for seed in (3, 4, 3):
        pooled = next(iter(build_site_loaders(site, TASK, _data(), train, seed, pool=pool).train))
        fresh = next(iter(build_site_loaders(site, TASK, _data(), train, seed).train))
        assert torch.equal(pooled[0], fresh[0]) and torch.equal(pooled[1], fresh[1])
    # three fresh builds validate 3 splits each; the pool validated its 3 splits once
    assert len(validated) == 3 * 3 + 3
    rows = read_manifest(site)
    write_manifest(site, rows[:-1])  # the hospital edits its manifest: built again
    build_site_loaders(site, TASK, _data(), train, 0, pool=pool)
    assert len(validated) == 3 * 3 + 3 + 3


def test_a_fresh_process_trusts_the_validated_index_until_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment starts a process per message: the second build must not read every cached
    array again (issue 16), and must validate in full once an image or its cache entry changed."""
    from fedmsk.data.dataset import build_site_datasets

    monkeypatch.setattr(cache_module, "RACY_SECONDS", -1.0)  # files here are seconds old
    site = _site(tmp_path, patients=6)
    data, train = _data(), TrainConfig()
    first = build_site_datasets(site, TASK, data, train)
    assert list((site / ".fedmsk-cache" / "validated").glob("*.json"))

    reads: list[Path] = []
    original = PreprocessCache._read_entry

    def counting(self: PreprocessCache, entry: Path) -> np.ndarray | None:
        reads.append(entry)
        return original(self, entry)

    monkeypatch.setattr(PreprocessCache, "_read_entry", counting)
    again = build_site_datasets(site, TASK, data, train)
    assert reads == []  # nothing decoded or read: the index was trusted
    for split in ("train", "val", "test"):
        assert again.datasets[split].items == first.datasets[split].items
    assert again.dropped == first.dropped
    image, label = again.datasets["train"][0]
    assert image.shape == (3, 32, 32) and reads  # arrays are still read when training

    reads.clear()
    _png(site / "images/p2_0.png", seed=12345)  # a changed image: validate everything again
    changed = build_site_datasets(site, TASK, data, train)
    assert len(reads) == 13
    digests = {i.path.name: i.digest for s in changed.datasets.values() for i in s.items}
    before = {i.path.name: i.digest for s in first.datasets.values() for i in s.items}
    assert digests["p2_0.png"] != before["p2_0.png"]

    reads.clear()
    build_site_datasets(site, TASK, data, train)  # the new index
    assert reads == []
    for entry in (site / ".fedmsk-cache").rglob("*.npy"):
        entry.unlink()  # a cleared cache is noticed too
        break
    build_site_datasets(site, TASK, data, train)
    assert len(reads) == 13


def test_a_site_with_unreadable_images_is_never_indexed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmsk.data.dataset import build_site_datasets

    monkeypatch.setattr(cache_module, "RACY_SECONDS", -1.0)
    site = _site(tmp_path, patients=4)
    (site / "images" / "broken.dcm").write_bytes(b"not a dicom file")
    write_manifest(
        site, [*read_manifest(site), ManifestRow("images/broken.dcm", "normal", "PID777")]
    )
    for _ in range(2):  # reported at every build, not remembered away
        built = build_site_datasets(site, TASK, _data(), TrainConfig())
        assert len(built.skipped) == 1 and built.dropped["unreadable_image"] == 1
    assert not list((site / ".fedmsk-cache" / "validated").glob("*.json"))


def test_a_site_reached_by_two_paths_gets_items_under_the_path_it_was_opened_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study links a held-out site into a copy of the federation: both paths share one
    cache and one index, and each build's items must lie under its own path."""
    from fedmsk.data.dataset import build_site_datasets

    monkeypatch.setattr(cache_module, "RACY_SECONDS", -1.0)
    site = _site(tmp_path, patients=4)
    linked = tmp_path / "copy" / "site"
    linked.parent.mkdir()
    linked.symlink_to(site, target_is_directory=True)
    for root in (site, linked, site):
        built = build_site_datasets(root, TASK, _data(), TrainConfig())
        items = [i for d in built.datasets.values() for i in d.items]
        assert items and all(i.path.is_relative_to(root) for i in items)


def test_intensity_warmup_ramps_gamma_blur_and_noise_in_with_the_run() -> None:
    """At the start of the run gamma, blur and noise are off (the image equals one passed
    through no intensity transform), halfway through the warm-up they are part-way, after it
    they are at full strength; the random stream is the same at every level, so a run's draws
    do not depend on where the ramp stands."""
    ramp = torch.linspace(0, 1, 48).repeat(48, 1).unsqueeze(0)
    ranges = {"gamma": [0.5, 2.0], "blur_sigma": [0.5, 1.0], "noise_std": [0.02, 0.05]}
    full = SeededAugment(_intensity_only(**ranges), seed=3)(ramp)
    changed = []
    for progress in (0.0, 0.25, 0.5, 0.9):
        augment = SeededAugment(_intensity_only(intensity_warmup=0.5, **ranges), seed=3)
        augment.set_progress(progress)
        out = augment(ramp)
        changed.append(float((out - ramp).abs().mean()))
        if progress >= 0.5:
            assert torch.equal(out, full)
    assert changed[0] == 0.0
    assert 0.0 < changed[1] < changed[2] == changed[3]
    assert changed[2] == float((full - ramp).abs().mean())


def test_intensity_start_keeps_the_transforms_off_then_ramps_them_in() -> None:
    """With a start, gamma, blur and noise stay off until ``intensity_start``, are at half
    strength midway to ``intensity_warmup`` and full from there; a start that is not before the
    warm-up's end fails when the configuration is built, naming both settings."""
    augment = SeededAugment(
        _intensity_only(noise_std=[0.1, 0.1], intensity_start=0.3, intensity_warmup=0.6), seed=0
    )
    levels = []
    for progress in (0.0, 0.29, 0.45, 0.6, 1.0):
        augment.set_progress(progress)
        levels.append(float(augment.intensity))
    assert levels == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    for start, warmup in ((0.6, 0.6), (0.7, 0.5), (0.3, 0.0), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(ValueError, match=f"intensity_start {start:g}, intensity_warmup"):
            AugmentConfig(intensity_start=start, intensity_warmup=warmup)


def test_intensity_warmup_reaches_dataloader_workers() -> None:
    """A persistent DataLoader worker holds its own copy of the dataset; the level lives in
    shared memory, so a worker started at the beginning of the run sees the ramp move."""
    from torch.utils.data import DataLoader, Dataset

    from fedmsk.data.augment import set_augment_progress

    class Flat(Dataset):
        def __init__(self) -> None:
            self.transform = SeededAugment(
                _intensity_only(noise_std=[0.1, 0.1], intensity_warmup=0.5), seed=0
            )

        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return self.transform(torch.full((1, 8, 8), 0.5))

    dataset = Flat()
    loader = DataLoader(dataset, batch_size=4, num_workers=1, persistent_workers=True)
    set_augment_progress(dataset, 0.0)
    assert float(next(iter(loader)).std()) == 0.0
    set_augment_progress(dataset, 1.0)
    assert float(next(iter(loader)).std()) > 0.05


def test_collimation_bands_cover_edges_only_at_a_bright_level() -> None:
    """Every collimated image gets a bright band on at least one edge, 3-15 % of its side
    (2-10 pixels of 64), at one level in [0.75, 1]; the middle of the image is untouched, and
    over many draws every edge gets one. At probability 0 nothing changes."""
    dark = torch.zeros(1, 64, 64)
    collimate = SeededAugment(_intensity_only(collimation=1.0), seed=0)
    seen = set()
    for _ in range(40):
        out = collimate(dark)
        assert torch.equal(out[..., 10:-10, 10:-10], dark[..., 10:-10, 10:-10])
        bands = {
            "top": out[0, :, 32],
            "bottom": out[0, :, 32].flip(0),
            "left": out[0, 32, :],
            "right": out[0, 32, :].flip(0),
        }
        widths = {side: int((line > 0).int().cumprod(0).sum()) for side, line in bands.items()}
        present = {side for side, w in widths.items() if w > 0}
        assert present, "a collimated image has at least one band"
        assert all(2 <= widths[side] <= 10 for side in present), widths
        levels = torch.unique(out[out > 0])
        assert len(levels) == 1 and 0.75 <= float(levels[0]) <= 1.0
        seen |= present
    assert seen == {"top", "bottom", "left", "right"}
    never = SeededAugment(_intensity_only(collimation=0.0), seed=0)
    assert torch.equal(never(dark), dark)
