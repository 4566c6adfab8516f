"""Grad-CAM heatmaps, overlays and outcome grids for the timm classifiers fedmsk trains.

Heatmaps are images of patients: they are computed where the images are (on a hospital node, or
in a researcher's local simulation) and written to that machine's run directory. Nothing here
sends anything over a network, and :mod:`fedmsk.report` only embeds the PNGs it finds on disk.

The heavy lifting is done by ``pytorch_grad_cam`` (package ``grad-cam``). What fedmsk adds is
picking the right layer for any supported backbone: the module that produces the last spatial
feature map before global pooling. For timm models that is the module whose output *is* the
tensor ``forward_features`` returns (``layer4`` for ResNets, ``bn2`` for EfficientNet/MnasNet,
``blocks`` for MobileNetV3, whose ``conv_head`` sits after the pooling and must not be used),
and, for LayerCAM, a finer map fused with the stage before it and averaged over shifted copies
of the image, so the network's stride-2 sampling does not print the same spots on every map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CAM_METHODS = ("gradcam", "gradcam++", "layercam")
# LayerCAM weighs each position by its own gradient, so it stays meaningful on a shallower,
# finer feature map; it is used on the last map at least this many cells wide (8 x 8 for a
# ResNet at 64 px, where the last stage is 2 x 2 and cannot show a fracture line), fused with
# the stage before it (twice as fine), as the LayerCAM paper fuses maps of several depths.
DETAIL_MIN_SIDE = 8
# A stride-2 stage after a map (ResNet's 1x1 stride-2 shortcut, a strided 3x3) takes gradient
# from every other cell much more than from the others, so a raw LayerCAM map is a lattice of
# spots at fixed places, the same in every image. Averaging the maps of copies of the image
# shifted over one period of that lattice, in steps of the finest map's cell, removes it; the
# per-axis count of shifts is capped so a map costs at most this many squared passes.
MAX_SHIFTS_PER_AXIS = 4


@dataclass
class OutcomeGrid:
    """What :func:`cam_grid_by_outcome` drew: rows in order, images per row, images scanned."""

    path: Path
    rows: list[str]
    counts: dict[str, int]
    scanned: int
    available: dict[str, int] = field(default_factory=dict)


def find_target_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module]:
    """Name and module of the last spatial feature map before global pooling.

    ``example`` is a (1, C, H, W) tensor of the size the model will see: the layer is found by
    running the model once with forward hooks, so any timm backbone (or a DP-compatible variant
    of one) works without a per-architecture table.
    """
    if example.ndim != 4:
        raise ValueError(f"example must be a (N, C, H, W) tensor, got shape {tuple(example.shape)}")
    named = [(name, module) for name, module in model.named_modules() if name]
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "forward_features"):
            picked = _layer_producing_features(model, named, example)
            if picked is not None:
                return picked
        return _last_spatial_layer(model, named, example)
    finally:
        model.train(was_training)


def _record_outputs(
    model: nn.Module, named: list[tuple[str, nn.Module]], run: Any
) -> tuple[list[tuple[str, nn.Module, Any]], Any]:
    """Run ``run()`` with a forward hook on every module; outputs come in completion order."""
    seen: list[tuple[str, nn.Module, Any]] = []
    handles = [
        module.register_forward_hook(
            lambda mod, _inputs, output, name=name: seen.append((name, mod, output))
        )
        for name, module in named
    ]
    try:
        with torch.no_grad():
            result = run()
    finally:
        for handle in handles:
            handle.remove()
    return seen, result


def find_detail_layer(
    model: nn.Module, example: torch.Tensor, min_side: int = DETAIL_MIN_SIDE
) -> tuple[str, nn.Module]:
    """The last module whose output is a feature map at least ``min_side`` cells on each side
    (completion order, so a whole stage wins over its last block's parts); the usual Grad-CAM
    layer when the final map is already that fine."""
    return _detail_layer(model, example, _eval_outputs(model, example), min_side)


def _detail_layer(
    model: nn.Module, example: torch.Tensor, seen: list[tuple[str, nn.Module, Any]], min_side: int
) -> tuple[str, nn.Module]:
    """:func:`find_detail_layer` over the outputs ``seen`` of one eval pass of ``example``."""
    final_name, final_module = find_target_layer(model, example)
    final = [out for name, _, out in seen if name == final_name]
    if final and min(final[-1].shape[-2:]) >= min_side:
        return final_name, final_module
    fine = [
        (name, module)
        for name, module, output in seen
        if isinstance(output, torch.Tensor)
        and output.ndim == 4
        and min(output.shape[-2:]) >= min_side
        and output.shape[-1] < example.shape[-1]  # a feature map, not the input resolution
    ]
    return fine[-1] if fine else (final_name, final_module)


def find_detail_layers(
    model: nn.Module, example: torch.Tensor, min_side: int = DETAIL_MIN_SIDE
) -> list[tuple[str, nn.Module, int]]:
    """The detail layer (:func:`find_detail_layer`) and, when the network has one, the last map
    at least twice as fine as it (the stage before it), finest first; each with the smaller
    side of its map, which :func:`lattice_shifts` needs (so the caller does not measure again)."""
    seen = _eval_outputs(model, example)  # one pass serves both the layer and the map sides
    detail_name, detail_module = _detail_layer(model, example, seen, min_side)
    sides = _map_sides(seen)
    detail_side = sides.get(detail_name, 0)
    finer = [
        name
        for name, side in sides.items()
        if side >= 2 * detail_side and side < example.shape[-1] and name != detail_name
    ]
    modules = dict(model.named_modules())
    picked = [(finer[-1], modules[finer[-1]], sides[finer[-1]])] if detail_side and finer else []
    return [*picked, (detail_name, detail_module, detail_side)]


def _eval_outputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, Any]]:
    """Every named module's output for one eval-mode pass of ``example``, in completion order;
    the model's mode is restored."""
    named = [(name, module) for name, module in model.named_modules() if name]
    was_training = model.training
    model.eval()
    try:
        seen, _ = _record_outputs(model, named, lambda: model(example))
    finally:
        model.train(was_training)
    return seen


def _map_sides(seen: list[tuple[str, nn.Module, Any]]) -> dict[str, int]:
    """Smaller side of each module's 4-D output in ``seen`` (:func:`_eval_outputs`), in
    completion order (a module seen twice keeps its last output)."""
    sides: dict[str, int] = {}
    for name, _, output in seen:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            sides.pop(name, None)
            sides[name] = int(min(output.shape[-2:]))
    return sides


def lattice_shifts(input_side: int, map_sides: Sequence[int]) -> list[int]:
    """Pixel shifts (per axis) that average out the stride-2 lattice of the coarsest of
    ``map_sides``: steps of the finest map's cell over two cells of the coarsest map."""
    finest, coarsest = max(map_sides), min(map_sides)
    if coarsest >= input_side:
        return [0]  # maps at the input's resolution: no stride, no lattice
    step = max(1, input_side // finest)
    count = max(1, min(MAX_SHIFTS_PER_AXIS, (2 * input_side // coarsest) // step))
    return [k * step for k in range(count)]


def place_on_canvas(images: torch.Tensor, top: int, left: int, margin: int) -> torch.Tensor:
    """``images`` on a black canvas ``margin`` pixels larger on each axis, at (``top``, ``left``).

    Black is each image's and channel's minimum, what the preprocessing pads an image to a
    square with. The whole image stays in every copy: shifting it inside its own frame instead
    would drop an edge (with the findings that lie there) and fill the other one.
    """
    n, channels, height, width = images.shape
    black = images.amin(dim=(-2, -1), keepdim=True)
    canvas = black.expand(n, channels, height + margin, width + margin).clone()
    canvas[..., top : top + height, left : left + width] = images
    return canvas


def _shift_averaged(cam: Any, images: torch.Tensor, targets: Any, shifts: list[int]) -> np.ndarray:
    """Mean of the maps of the image placed at each offset of ``shifts`` x ``shifts`` on a
    canvas (a fully convolutional network takes any size), each map cut back to the image."""
    n, _, height, width = images.shape
    margin = max(shifts)
    total = np.zeros((n, height, width), dtype=np.float64)
    for top in shifts:
        for left in shifts:
            placed = place_on_canvas(images, top, left, margin)
            maps = np.asarray(cam(input_tensor=placed.requires_grad_(True), targets=targets))
            total += np.nan_to_num(maps)[:, top : top + height, left : left + width]
    peaks = total.reshape(n, -1).max(axis=1)
    scale = np.where(peaks > 0, peaks, 1.0)[:, None, None]
    return (total / scale).astype(np.float32)


def _layer_producing_features(
    model: nn.Module, named: list[tuple[str, nn.Module]], example: torch.Tensor
) -> tuple[str, nn.Module] | None:
    seen, features = _record_outputs(model, named, lambda: model.forward_features(example))
    if not isinstance(features, torch.Tensor) or features.ndim != 4:
        return None
    producers = [(name, module) for name, module, output in seen if output is features]
    # The outermost producer completes last; hooking it is equivalent and its name is readable.
    return producers[-1] if producers else None


def _last_spatial_layer(
    model: nn.Module, named: list[tuple[str, nn.Module]], example: torch.Tensor
) -> tuple[str, nn.Module]:
    seen, _ = _record_outputs(model, named, lambda: model(example))
    four_d = [
        (name, module, output)
        for name, module, output in seen
        if isinstance(output, torch.Tensor) and output.ndim == 4
    ]
    if not four_d:
        raise ValueError(
            f"{type(model).__name__}: no module produces a 4-D feature map; Grad-CAM needs a "
            "convolutional backbone"
        )
    spatial = [item for item in four_d if item[2].shape[-1] * item[2].shape[-2] > 1]
    name, module, _ = (spatial or four_d)[-1]
    return name, module


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    target_classes: Sequence[int] | int | None = None,
    method: str = "gradcam",
    target_layer: nn.Module | None = None,
    dealias: bool = True,
) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1], one per image, for the given class of each image.

    ``target_classes``: one int for all images, one per image, or None for the predicted class.
    LayerCAM, unless ``target_layer`` is given, fuses the detail map and the stage before it
    (:func:`find_detail_layers`) and, with ``dealias``, averages over shifted copies of each
    image (:func:`lattice_shifts`) so that the stride-2 lattice does not show as fixed spots.
    The model's train/eval mode and its parameters' ``.grad`` are restored afterwards, so this
    can be called on a node between rounds. An image with no positive evidence for its class
    gets an all-zero map (that is what Grad-CAM's ReLU means, not an error).
    """
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in CAM_METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(CAM_METHODS)}")
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    device = next(model.parameters()).device
    images = images.detach().to(device=device, dtype=torch.float32)
    shifts = [0]
    if target_layer is not None:
        target_layers = [target_layer]
    elif method == "layercam":
        found = find_detail_layers(model, images[:1])
        target_layers = [module for _, module, _ in found]
        if dealias:
            shifts = lattice_shifts(images.shape[-1], [side for _, _, side in found])
    else:
        target_layers = [find_target_layer(model, images[:1])[1]]
    targets = _targets(target_classes, len(images), ClassifierOutputTarget)
    cam_class = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}[method]
    was_training = model.training
    saved_grads = [(param, param.grad) for param in model.parameters()]
    try:
        with cam_class(model=model, target_layers=target_layers) as cam:
            heatmaps = _shift_averaged(cam, images, targets, shifts)
    finally:
        model.train(was_training)
        for param, grad in saved_grads:
            param.grad = grad
    heatmaps = np.nan_to_num(np.asarray(heatmaps, dtype=np.float32))
    return np.clip(heatmaps, 0.0, 1.0)


def _targets(target_classes: Sequence[int] | int | None, n: int, target_type: Any) -> Any:
    if target_classes is None:
        return None
    if isinstance(target_classes, int | np.integer):
        return [target_type(int(target_classes)) for _ in range(n)]
    classes = [int(c) for c in target_classes]
    if len(classes) != n:
        raise ValueError(f"target_classes has {len(classes)} entries for {n} images")
    return [target_type(c) for c in classes]


def to_display(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """An image as (H, W, 3) float in [0, 1]: accepts HW, HWC or CHW, any value range.

    Datasets may normalise with a mean and std, so the image is min-max scaled for display.
    """
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array.astype(np.float32)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"image must be HW, HWC or CHW with 1 or 3 channels, got {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    return np.clip((array - low) / (high - low), 0, 1) if high > low else np.zeros_like(array)


def overlay(
    image: np.ndarray | torch.Tensor,
    heatmap: np.ndarray,
    alpha: float = 0.4,
    colormap: str = "jet",
) -> np.ndarray:
    """The image with the heatmap blended on top, as RGB uint8 (H, W, 3)."""
    from matplotlib import colormaps

    base = to_display(image)
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heatmap shape {heat.shape} does not match image {base.shape[:2]}")
    coloured = colormaps[colormap](heat)[..., :3]
    blended = (1 - alpha) * base + alpha * coloured
    return np.round(np.clip(blended, 0, 1) * 255).astype(np.uint8)


def save_cam_grid(
    path: Path | str,
    images: Sequence[Any],
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    titles: Sequence[str] | None = None,
    ncols: int = 4,
) -> Path:
    """Write overlays of images and heatmaps as one PNG grid (titles under nothing else)."""
    if len(images) != len(heatmaps):
        raise ValueError(f"{len(images)} images but {len(heatmaps)} heatmaps")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"{len(titles)} titles for {len(images)} images")
    cells = [overlay(img, heat) for img, heat in zip(images, heatmaps, strict=True)]
    names = list(titles) if titles is not None else [""] * len(cells)
    ncols = max(1, min(ncols, len(cells) or 1))
    nrows = max(1, -(-len(cells) // ncols))
    rows = [
        ("", cells[r * ncols : (r + 1) * ncols], names[r * ncols : (r + 1) * ncols])
        for r in range(nrows)
    ]
    return _draw_rows(Path(path), rows, ncols)


def _draw_rows(
    path: Path,
    rows: list[tuple[str, list[np.ndarray], list[str]]],
    ncols: int,
    method: str | None = None,
) -> Path:
    """The grid as a PNG; with ``method``, the PNG records it (for the report's heading)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas

    from fedmsk.report_data import CAM_METHOD_PNG_KEY

    nrows = max(1, len(rows))
    fig = Figure(figsize=(2.2 * ncols + 0.6, 2.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for r, (label, cells, names) in enumerate(rows):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(cells):
                ax.imshow(cells[c])
                ax.set_title(names[c], fontsize=8)
            elif c == 0:
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=9, color="grey")
        if label:
            axes[r][0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={CAM_METHOD_PNG_KEY: method} if method else None)
    return path


def _iter_batches(data: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (images, labels) from a DataLoader or from a dataset of (image, label) items."""
    from torch.utils.data import DataLoader

    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    for batch in loader:
        images, labels = batch[0], batch[1]
        yield images, torch.as_tensor(labels).long().view(-1)


def _as_read_dataset(data: Any) -> Any | None:
    """The images of ``data`` as read (before input normalisation), indexed in the order
    ``data`` yields them, where its dataset can give them (``as_read``) and that order is fixed;
    otherwise None, and the grid shows the model's input."""
    from torch.utils.data import ConcatDataset, DataLoader, SequentialSampler

    loader = data if isinstance(data, DataLoader) else None
    if loader is not None and (
        loader.batch_size is None or not isinstance(loader.sampler, SequentialSampler)
    ):
        return None
    dataset = data if loader is None else loader.dataset
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    if not all(callable(getattr(part, "as_read", None)) for part in parts):
        return None
    return ConcatDataset([part.as_read() for part in parts])


def _outcome_group(label: int, prob: np.ndarray, threshold: float, classes: Sequence[str]) -> str:
    """Binary: TP/FP/FN/TN of the positive class (index 1). Multi-class: the true class."""
    if len(classes) == 2:
        positive = bool(prob[1] >= threshold)
        if label == 1:
            return "true positive" if positive else "false negative"
        return "false positive" if positive else "true negative"
    return f"true {classes[label]}"


def cam_grid_by_outcome(
    model: nn.Module,
    data: Any,
    threshold: float,
    classes: Sequence[str],
    per_group: int = 4,
    out_path: Path | str = "figures/cam_outcomes.png",
    method: str = "gradcam",
    batch_size: int = 16,
) -> OutcomeGrid:
    """One PNG with a row of Grad-CAM overlays per outcome group.

    Binary tasks: rows are true/false positives/negatives at ``threshold`` on the positive class
    (index 1), and the CAM explains the positive class. Multi-class: one row per true class; the
    CAM explains the predicted class and each title names it. The heatmap is computed on the
    model's input and drawn over the image as read where the dataset gives it (``as_read``: no
    input normalisation). The images stay on this machine.
    """
    if len(classes) < 2:
        raise ValueError(f"classes must name at least two classes, got {list(classes)}")
    binary = len(classes) == 2
    rows = (
        ["true positive", "false negative", "false positive", "true negative"]
        if binary
        else [f"true {name}" for name in classes]
    )
    # (model input, label, predicted class, score, image shown under the heatmap)
    chosen: dict[str, list[tuple[torch.Tensor, int, int, float, torch.Tensor]]] = {
        row: [] for row in rows
    }
    available = {row: 0 for row in rows}
    scanned = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        as_read = _as_read_dataset(data)  # read again only for the images drawn
        for images, labels in _iter_batches(data, batch_size):
            with torch.no_grad():
                probs = torch.softmax(model(images.to(device).float()), dim=1).cpu().numpy()
            for image, label, prob in zip(images, labels.tolist(), probs, strict=True):
                index = scanned
                scanned += 1
                group = _outcome_group(int(label), prob, threshold, classes)
                available[group] += 1
                if len(chosen[group]) < per_group:
                    predicted = int(np.argmax(prob))
                    score = float(prob[1] if binary else prob[predicted])
                    seen = image if as_read is None else as_read[index][0]
                    chosen[group].append((image, int(label), predicted, score, seen))
    finally:
        model.train(was_training)
    drawn = _cam_rows(model, chosen, rows, classes, binary, method)
    path = _draw_rows(Path(out_path), drawn, max(1, per_group), method)
    counts = {row: len(chosen[row]) for row in rows}
    return OutcomeGrid(path=path, rows=rows, counts=counts, scanned=scanned, available=available)


def _cam_rows(
    model: nn.Module,
    chosen: dict[str, list[tuple[torch.Tensor, int, int, float, torch.Tensor]]],
    rows: list[str],
    classes: Sequence[str],
    binary: bool,
    method: str,
) -> list[tuple[str, list[np.ndarray], list[str]]]:
    drawn: list[tuple[str, list[np.ndarray], list[str]]] = []
    for row in rows:
        items = chosen[row]
        if not items:
            drawn.append((row, [], []))
            continue
        images = torch.stack([item[0] for item in items]).float()
        targets = [1 if binary else item[2] for item in items]
        heatmaps = gradcam(model, images, targets, method=method)
        if binary:
            titles = [f"p({classes[1]})={item[3]:.2f}" for item in items]
        else:
            titles = [f"pred {classes[item[2]]} ({item[3]:.2f})" for item in items]
        shown = [item[4] for item in items]
        cells = [overlay(img, heat) for img, heat in zip(shown, heatmaps, strict=True)]
        drawn.append((row, cells, titles))
    return drawn
