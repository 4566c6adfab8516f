"""Does the heatmap point at the lesion? The pointing game on images whose lesion box is known.

A heatmap is only worth showing a clinician if its peak falls on the finding. The synthetic
generator knows where each fracture line is (``SITE/lesions.csv``, boxes as fractions of the
stored image), so for the true positives of a center we can count how often the maximum of the
class-activation map lands inside the box (with a tolerance of ``size / 32`` pixels, as the
pointing game allows), and set that against chance: the share of the image the tolerant box
covers, which is what a map with its peak at a random place would score. A one-sided binomial
test says whether the hits beat chance. Only counts leave this module.

Boxes are mapped into the model's input the way the preprocessing cache maps pixels: centred
on a black square canvas, then resized (``fedmsk.data.cache.resize_square``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedmsk.explain import gradcam

Box = tuple[float, float, float, float]
POINTING_FILE = "pointing_game.json"
# Hits must beat chance at this one-sided binomial level to say the map points at the lesion.
ALPHA = 0.05


@dataclass(frozen=True)
class PointingResult:
    """Counts of one pointing game: ``hits`` of ``n`` true positives, ``chance`` the hit rate
    of a random peak (mean covered share), ``p_value`` of the hits under that chance."""

    n: int
    hits: int
    chance: float
    p_value: float
    method: str

    @property
    def accuracy(self) -> float:
        return self.hits / self.n if self.n else float("nan")

    @property
    def beats_chance(self) -> bool:
        return self.n > 0 and self.p_value < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"accuracy": self.accuracy, "beats_chance": self.beats_chance}


def box_in_input(box: Box, height: int, width: int, size: int) -> Box:
    """A (top, left, bottom, right) fraction box of an ``height`` x ``width`` image, in pixels
    of the ``size`` x ``size`` model input (padded to a centred square, then resized)."""
    side = max(height, width)
    top_pad, left_pad = (side - height) // 2, (side - width) // 2
    scale = size / side
    top, left, bottom, right = box
    return (
        (top_pad + top * height) * scale,
        (left_pad + left * width) * scale,
        (top_pad + bottom * height) * scale,
        (left_pad + right * width) * scale,
    )


def tolerance_for(size: int) -> float:
    return size / 32.0


def peak_hits(heatmaps: np.ndarray, boxes: Sequence[Box], tolerance: float) -> list[bool]:
    """Whether each map's maximum (the centre of its peak pixel) is inside its widened box."""
    hits = []
    for heatmap, (top, left, bottom, right) in zip(heatmaps, boxes, strict=True):
        row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
        y, x = row + 0.5, col + 0.5
        hits.append(
            top - tolerance <= y <= bottom + tolerance
            and left - tolerance <= x <= right + tolerance
        )
    return hits


def chance_rate(boxes: Sequence[Box], size: int, tolerance: float) -> float:
    """Mean share of the input covered by the widened boxes: a random peak's hit rate."""
    if not boxes:
        return float("nan")
    shares = []
    for top, left, bottom, right in boxes:
        rows = min(size, bottom + tolerance) - max(0.0, top - tolerance)
        cols = min(size, right + tolerance) - max(0.0, left - tolerance)
        shares.append(max(0.0, rows) * max(0.0, cols) / (size * size))
    return float(np.mean(shares))


def binomial_tail(hits: int, n: int, chance: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, chance)."""
    from scipy.stats import binom

    if n == 0:
        return 1.0
    return float(binom.sf(hits - 1, n, min(max(chance, 0.0), 1.0)))


def pointing_game(
    model: nn.Module,
    images: torch.Tensor,
    boxes: Sequence[Box],
    target_class: int | Sequence[int] = 1,
    method: str = "layercam",
    batch_size: int = 16,
) -> PointingResult:
    """Play the pointing game for ``images`` (N, C, S, S) whose lesion boxes are given in
    input pixels (:func:`box_in_input`); the map explains ``target_class`` (one for all, or
    one per image)."""
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
    targets = (
        [int(target_class)] * len(images)
        if isinstance(target_class, int)
        else [int(t) for t in target_class]
    )
    size = int(images.shape[-1])
    tolerance = tolerance_for(size)
    hits: list[bool] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        maps = gradcam(model, batch, targets[start : start + batch_size], method=method)
        hits += peak_hits(maps, boxes[start : start + batch_size], tolerance)
    chance = chance_rate(boxes, size, tolerance)
    count = int(sum(hits))
    p_value = binomial_tail(count, len(hits), chance) if hits else 1.0
    if math.isnan(chance):
        chance = 0.0
    return PointingResult(len(hits), count, chance, p_value, method)


def score_site(
    model: nn.Module,
    dataset: Any,
    site_dir: Any,
    threshold: float,
    method: str = "layercam",
) -> PointingResult | None:
    """The pointing game on a site's correctly found images, for those the generator left a
    lesion box for; None when the site has no boxes. Binary tasks: the true positives at
    ``threshold``, explaining the positive class. Multi-class: the images whose argmax is their
    class, explaining that class.

    ``dataset`` is an unaugmented :class:`fedmsk.data.dataset.SiteDataset` of the site.
    """
    from pathlib import Path

    from fedmsk.data.images import load_image
    from fedmsk.data.synthetic import read_lesions

    site_dir = Path(site_dir)
    boxes = read_lesions(site_dir)
    if not boxes:
        return None
    chosen: list[torch.Tensor] = []
    placed: list[Box] = []
    targets: list[int] = []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for index, item in enumerate(dataset.items):
            key = item.path.relative_to(site_dir).as_posix()
            if key not in boxes:
                continue
            image, _ = dataset[index]
            with torch.no_grad():
                probs = torch.softmax(model(image[None].to(device).float()), dim=1)[0]
            if len(probs) == 2:
                found = item.label == 1 and float(probs[1]) >= threshold
            else:
                found = int(torch.argmax(probs)) == item.label
            if not found:
                continue
            height, width = np.asarray(load_image(item.path).pixels).shape[:2]
            chosen.append(image)
            targets.append(int(item.label))
            placed.append(box_in_input(boxes[key], height, width, int(image.shape[-1])))
    finally:
        model.train(was_training)
    if not chosen:
        return PointingResult(0, 0, 0.0, 1.0, method)
    return pointing_game(model, torch.stack(chosen).float(), placed, targets, method=method)


def combine(results: Sequence[PointingResult]) -> PointingResult | None:
    """One game over several sites' images: hits and counts add, chance is the image-weighted
    mean, the binomial test is redone on the totals."""
    played = [r for r in results if r.n]
    if not played:
        return results[0] if results else None
    n = sum(r.n for r in played)
    hits = sum(r.hits for r in played)
    chance = sum(r.chance * r.n for r in played) / n
    return PointingResult(n, hits, chance, binomial_tail(hits, n, chance), played[0].method)


def write_pointing(run_dir: Any, games: dict[str, PointingResult]) -> None:
    """Add ``games`` (label -> result) to ``RUN_DIR/pointing_game.json`` for the report."""
    import json
    from pathlib import Path

    path = Path(run_dir) / POINTING_FILE
    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    known.update({label: game.as_dict() for label, game in games.items()})
    path.write_text(json.dumps(known, indent=2, sort_keys=True), encoding="utf-8")


def score_sites(
    model: nn.Module, datasets: dict[str, tuple[Any, Any]], threshold: float, method: str
) -> PointingResult | None:
    """:func:`score_site` over several sites (alias -> (dataset, site dir)), combined."""
    played = [
        result
        for dataset, site_dir in datasets.values()
        if (result := score_site(model, dataset, site_dir, threshold, method)) is not None
    ]
    return combine(played) if played else None
