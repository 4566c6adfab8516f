"""Training-time augmentation, and a one-off "static augmentation" of a site's training images.

On-the-fly augmentation runs on the (C, H, W) float tensors read from the preprocessing cache,
so it never triggers a decode. It is deliberately mild (radiographs are not natural photos: a
strong crop can cut away the fracture, a large rotation invents anatomy). Its randomness comes
from its own :class:`torch.Generator`, not torch's global one, so a run is reproducible from its
seed whatever else draws random numbers; DataLoader workers get distinct streams through
:func:`worker_init_fn`.

Static augmentation (:func:`static_augment`) writes N augmented copies of each training image
once, as PNG files beside the site's images, and adds them to the manifest with split ``train``
and the patient of the original, so the copies can never leak into validation or test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from fedmsk.config import AugmentConfig
from fedmsk.data.manifest import ManifestRow, read_manifest, write_manifest
from fedmsk.data.splits import assign_splits, find_split_issues

STATIC_DIR = "augmented"


def static_copies_under_dp(how_many: str) -> str:
    """Why static copies and DP-SGD do not mix (one message for the node and the studies)."""
    return (
        f"statically augmented copies ({how_many}, the {STATIC_DIR}/ folder) are refused under "
        "DP-SGD: the guarantee protects one image, and each copy adds its original's "
        "contribution again. Remove them from the manifest, or train without privacy "
        "(on-the-fly augmentation, data.augment=true, is unaffected)"
    )


# Collimator bands: how wide a band is (fraction of the image side) and how bright.
COLLIMATION_WIDTH = (0.03, 0.15)
COLLIMATION_LEVEL = (0.75, 1.0)


class SeededAugment:
    """Random resized crop, rotation, gamma, brightness/contrast, collimator bands, blur, noise
    and optional flip.

    Call it on a float tensor (C, H, W) in [0, 1]; the output has the same shape and range.
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0) -> None:
        self.config = config or AugmentConfig()
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # How much of the gamma / blur / noise ranges is in use (0-1); in shared memory so
        # that DataLoader workers, persistent ones included, see it change.
        self.intensity = torch.ones(())
        if self.config.intensity_warmup > 0:
            self.intensity.share_memory_()

    def set_progress(self, progress: float) -> None:
        """Place the transforms at ``progress`` (0-1, the share of the run's steps taken).

        Why: gamma, blur and noise hide the thin line of a fracture, and at their full ranges
        from the first step pooled training stayed on the loss plateau for 14-26 epochs (or the
        whole run) on draw 14 of the built-in federation; without them it left it at epochs 8-10.
        Ramped in from the first step to the midpoint, 5 of 25 pooled runs over eight draws still
        left it only at epoch 20-30 or never; kept off until ``intensity_start`` (30 %) and
        ramped in to ``intensity_warmup`` (60 %), 2 of 25 did, and the held-out AUC was higher in
        17 of 25 pairs (docs/benchmarks.md, "Intensity augmentation"). The model first finds
        the finding, then learns to read it through other centers' contrast, sharpness and noise.
        """
        start, warmup = self.config.intensity_start, self.config.intensity_warmup
        level = 1.0 if warmup <= 0 else min(1.0, max(0.0, (progress - start) / (warmup - start)))
        self.intensity.fill_(level)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.generator.manual_seed(seed)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.config
        area = height * width
        for _ in range(10):
            target = area * self._uniform(*cfg.crop_scale)
            log_ratio = self._uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
            ratio = math.exp(log_ratio)
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(self._uniform(0, height - h + 1 - 1e-9))
                left = int(self._uniform(0, width - w + 1 - 1e-9))
                return top, left, h, w
        return 0, 0, height, width

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        height, width = image.shape[-2:]
        top, left, h, w = self._crop_box(height, width)
        out = tvf.resized_crop(image, top, left, h, w, [height, width], antialias=True)
        if cfg.rotation_degrees > 0:
            angle = self._uniform(-cfg.rotation_degrees, cfg.rotation_degrees)
            out = tvf.rotate(out, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        level = float(self.intensity)
        low, high = cfg.gamma
        if (low, high) != (1.0, 1.0):
            log_gamma = level * self._uniform(math.log(low), math.log(high))
            out = out.clamp(0.0, 1.0).pow(math.exp(log_gamma))
        if cfg.brightness > 0:
            out = tvf.adjust_brightness(out, self._uniform(1 - cfg.brightness, 1 + cfg.brightness))
        if cfg.contrast > 0:
            out = tvf.adjust_contrast(out, self._uniform(1 - cfg.contrast, 1 + cfg.contrast))
        if cfg.collimation > 0 and self._uniform(0.0, 1.0) < cfg.collimation:
            out = self.collimate(out)
        sigma = level * self._uniform(*cfg.blur_sigma) if cfg.blur_sigma[1] > 0 else 0.0
        if sigma > 0.05:
            kernel = 2 * math.ceil(3 * sigma) + 1
            out = tvf.gaussian_blur(out, [kernel, kernel], [sigma, sigma])
        std = level * self._uniform(*cfg.noise_std) if cfg.noise_std[1] > 0 else 0.0
        if std > 0:
            out = out + std * torch.randn(out.shape, generator=self.generator)
        if cfg.hflip and self._uniform(0.0, 1.0) < 0.5:
            out = tvf.horizontal_flip(out)
        return out.clamp_(0.0, 1.0)

    def collimate(self, image: torch.Tensor) -> torch.Tensor:
        """Bright bands along one to four edges, each 3-15 % of the side, level 0.75-1.

        Why: a collimator's shutters leave unexposed, bright strips at the edges of some
        centers' radiographs. A model that never saw them in training can read their sharp
        horizontal or vertical edges as a finding: in the VCF protocol's draw 5 the control
        center alone was collimated and every model, pooled included, called all its images
        fresh (AUC 0.52; 0.92 on the same draw generated without collimation; docs/studies.md).
        Applied after the rotation, so the bands stay parallel to the image edges as a
        detector's are.
        """
        edges = [self._uniform(0.0, 1.0) < 0.5 for _ in range(4)]
        if not any(edges):
            edges[int(self._uniform(0.0, 4.0 - 1e-9))] = True
        out = image.clone()
        level = self._uniform(*COLLIMATION_LEVEL)
        # top, bottom, left, right: (dimension, whether the band ends at the last row/column)
        for (dim, at_end), present in zip(
            ((-2, False), (-2, True), (-1, False), (-1, True)), edges, strict=True
        ):
            if present:
                size = image.shape[dim]
                band = max(1, round(size * self._uniform(*COLLIMATION_WIDTH)))
                out.narrow(dim, size - band if at_end else 0, band).fill_(level)
        return out


def worker_init_fn(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream.

    Workers receive a copy of the dataset, generator state included, so without this every
    worker would repeat one stream. ``info.seed`` differs per worker and is drawn from the
    loader's seeded generator when its workers start (every epoch, or once per loader with
    persistent workers, whose streams then run on), so runs stay reproducible.
    """
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    for transform in _seeded_augments(info.dataset):
        transform.reseed((transform.seed * 1_000_003 + info.seed) % 2**63)


def set_augment_progress(dataset: object, progress: float) -> None:
    """Tell every augmentation of ``dataset`` how far the run is (see
    :meth:`SeededAugment.set_progress`); a dataset without one is left alone."""
    for transform in _seeded_augments(dataset):
        transform.set_progress(progress)


def _seeded_augments(dataset: object) -> list[SeededAugment]:
    """The augmentations of a dataset or of every part of a ``ConcatDataset`` (pooled training
    joins the sites' datasets, each with its own stream)."""
    parts = getattr(dataset, "datasets", None)
    if isinstance(parts, list | tuple):
        return [t for part in parts for t in _seeded_augments(part)]
    transform = getattr(dataset, "transform", None)
    return [transform] if isinstance(transform, SeededAugment) else []


def _save_png(pixels: torch.Tensor, path: Path) -> None:
    from PIL import Image

    array = np.round(pixels.clamp(0, 1).numpy() * 255.0).astype(np.uint8)
    image = (
        Image.fromarray(array[0])
        if array.shape[0] == 1
        else Image.fromarray(np.transpose(array, (1, 2, 0)))
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def static_augment(
    site_dir: Path,
    copies: int,
    seed: int,
    *,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    split_seed: int = 0,
    frame: str = "0",
    config: AugmentConfig | None = None,
) -> int:
    """Write ``copies`` augmented PNGs of every training image and add them to the manifest.

    Splits are fixed first (``assign_splits`` with ``ratios`` / ``split_seed``, the same call
    the dataset builder makes) and written to the manifest, so each copy is certain to be in
    ``train`` together with every other image of its patient. Copies go to
    ``SITE_DIR/augmented/``; running again replaces earlier copies. Unreadable images are
    skipped. Returns the number of images written.
    """
    from fedmsk.data.errors import ImageReadError
    from fedmsk.data.images import load_image

    if copies < 0:
        raise ValueError(f"copies={copies}: must be >= 0")
    site_dir = Path(site_dir)
    rows = [r for r in read_manifest(site_dir) if not r.image.startswith(f"{STATIC_DIR}/")]
    kept, _ = find_split_issues(rows)
    kept_ids = {id(r) for r in kept}
    assigned = iter(assign_splits(kept, ratios, split_seed))
    rows = [next(assigned) if id(r) in kept_ids else r for r in rows]
    augment = SeededAugment(config, seed)
    new_rows: list[ManifestRow] = []
    for index, row in enumerate(r for r in rows if r.split == "train"):
        try:
            loaded = load_image(site_dir / row.image, frame=frame)
        except ImageReadError:
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(np.transpose(loaded.pixels, (2, 0, 1))))
        for k in range(copies):
            name = f"{STATIC_DIR}/{index:06d}_{Path(row.image).stem}_aug{k}.png"
            _save_png(augment(tensor.float()), site_dir / name)
            new_rows.append(replace(row, image=name, split="train"))
    write_manifest(site_dir, rows + new_rows)
    return len(new_rows)
