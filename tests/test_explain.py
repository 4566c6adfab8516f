"""Grad-CAM on every supported backbone, overlays and outcome grids (tiny random-init models)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmsk.config import compose
from fedmsk.explain import (
    cam_grid_by_outcome,
    find_detail_layers,
    find_target_layer,
    gradcam,
    lattice_shifts,
    overlay,
    place_on_canvas,
    save_cam_grid,
)
from fedmsk.models import model_from_config
from fedmsk.report_data import CAM_METHOD_PNG_KEY, cam_figure_methods

torch.set_num_threads(1)

ARCHITECTURES = {
    # name -> the module that holds the last spatial feature map before global pooling
    "resnet18": "layer4",
    "resnet34": "layer4",
    "resnet50": "layer4",
    "efficientnet_b0": "bn2",
    "mobilenetv3_large_100": "blocks",
    "mobilenetv3_small_100": "blocks",
    "mnasnet_100": "bn2",
}


def _model(name: str, in_chans: int, num_classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    # With random weights a class can have no positive evidence anywhere (Grad-CAM is then 0 by
    # definition). Non-negative weights after the pooling make the target class's evidence
    # positive, so a constant map can only come from a wrong layer or broken plumbing.
    head = [model.get_classifier()]
    if hasattr(model, "conv_head") and name.startswith("mobilenetv3"):
        head.append(model.conv_head)
    with torch.no_grad():
        for layer in head:
            layer.weight.abs_()
            if layer.bias is not None:
                layer.bias.zero_()
    return model.eval()


def _images(n: int, in_chans: int, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, in_chans, size, size, generator=generator) * 0.2
    images[:, :, size // 4 : size // 2, size // 4 : size // 2] += 0.8  # a bright "lesion"
    return images


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_gradcam_on_each_backbone(name: str, in_chans: int) -> None:
    model = _model(name, in_chans)
    images = _images(2, in_chans, 64)
    layer_name, _ = find_target_layer(model, images[:1])
    assert layer_name == ARCHITECTURES[name]

    heatmaps = gradcam(model, images, target_classes=1)
    assert heatmaps.shape == (2, 64, 64)
    assert heatmaps.dtype == np.float32
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    for heat in heatmaps:
        assert float(heat.std()) > 1e-3, "heatmap is constant"
        assert float(heat.max()) > 0.5


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_100"])
def test_gradcam_plus_plus_and_predicted_class(name: str) -> None:
    model = _model(name, 1)
    images = _images(3, 1, 48)
    plus = gradcam(model, images, [1, 1, 1], method="gradcam++")
    assert plus.shape == (3, 48, 48)
    assert plus.min() >= 0.0 and plus.max() <= 1.0
    assert all(float(h.std()) > 1e-3 for h in plus)
    predicted = gradcam(model, images, None)
    assert predicted.shape == (3, 48, 48)


def test_gradcam_restores_mode_and_grads() -> None:
    model = _model("resnet18", 1).train()
    images = _images(2, 1, 32)
    gradcam(model, images, 1)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_rejects_bad_arguments() -> None:
    model = _model("resnet18", 1)
    with pytest.raises(ValueError, match="method"):
        gradcam(model, _images(1, 1, 32), 1, method="scorecam")
    with pytest.raises(ValueError, match="target_classes"):
        gradcam(model, _images(2, 1, 32), [1])


def test_mobilenet_head_after_pooling_is_not_picked() -> None:
    """MobileNetV3's conv_head is 4-D but 1x1 (after pooling): a CAM there would be flat."""
    model = _model("mobilenetv3_small_100", 3)
    name, _ = find_target_layer(model, _images(1, 3, 64))
    assert not name.startswith("conv_head")


def test_fallback_picks_last_spatial_conv_without_forward_features() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.stage = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.after_pool = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.after_pool(self.pool(self.stage(self.stem(x)))).flatten(1))

    name, _ = find_target_layer(Plain(), torch.rand(1, 1, 32, 32))
    assert name == "stage"


def test_overlay_accepts_layouts() -> None:
    heat = np.zeros((16, 16), dtype=np.float32)
    heat[4:8, 4:8] = 1.0
    for image in (np.random.rand(16, 16), np.random.rand(1, 16, 16), torch.rand(3, 16, 16)):
        rgb = overlay(image, heat)
        assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    hot = overlay(np.zeros((16, 16)), heat)
    assert not np.array_equal(hot[5, 5], hot[12, 12])
    with pytest.raises(ValueError, match="heatmap shape"):
        overlay(np.zeros((8, 8)), heat)


def test_save_cam_grid_writes_png(tmp_path) -> None:
    images = [np.random.rand(32, 32) for _ in range(5)]
    heatmaps = np.random.rand(5, 32, 32).astype(np.float32)
    path = save_cam_grid(tmp_path / "figures" / "cam_grid.png", images, heatmaps, list("abcde"))
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100


def test_cam_grid_by_outcome_binary(tmp_path) -> None:
    model = _model("resnet18", 1)
    images = _images(12, 1, 32, seed=3)
    labels = torch.tensor([0, 1] * 6)
    with torch.no_grad():
        scores = torch.softmax(model(images), dim=1)[:, 1]
    threshold = float(scores.median())  # some predicted positive, some negative
    grid = cam_grid_by_outcome(
        model,
        DataLoader(TensorDataset(images, labels), batch_size=5),
        threshold,
        ["normal", "fracture"],
        per_group=2,
        out_path=tmp_path / "cam_outcomes.png",
    )
    assert grid.scanned == 12
    assert grid.rows == ["true positive", "false negative", "false positive", "true negative"]
    assert sum(grid.available.values()) == 12
    predicted = (scores >= threshold).long()
    expected_tp = int(((predicted == 1) & (labels == 1)).sum())
    assert grid.available["true positive"] == expected_tp
    assert grid.counts["true positive"] == min(2, expected_tp)
    with Image.open(grid.path) as img:
        assert img.format == "PNG"
        assert img.text[CAM_METHOD_PNG_KEY] == "gradcam"  # the report names the method by it
    assert cam_figure_methods([grid.path]) == ["gradcam"]


def test_cam_grid_by_outcome_multiclass_dataset(tmp_path) -> None:
    model = _model("mobilenetv3_small_100", 1, num_classes=3)
    images = _images(6, 1, 32, seed=4)
    dataset = TensorDataset(images, torch.tensor([0, 1, 2, 0, 1, 2]))
    grid = cam_grid_by_outcome(
        model, dataset, 0.5, ["a", "b", "c"], per_group=3, out_path=tmp_path / "cam_mc.png"
    )
    assert grid.rows == ["true a", "true b", "true c"]
    assert grid.counts == {"true a": 2, "true b": 2, "true c": 2}
    assert grid.path.is_file()


# -- LayerCAM without the stride-2 lattice -----------------------------------------------------


def test_layercam_fuses_the_detail_map_with_the_stage_before_it() -> None:
    """The default model at its default size: LayerCAM on layer2 (8 x 8) and layer1 (16 x 16),
    averaged over shifts of 0-24 px (one 8 px cell of layer1, over two cells of layer2)."""
    cfg = compose([])
    model = model_from_config(cfg).eval()
    size = cfg.data.image_size
    example = torch.zeros(1, cfg.data.in_chans, size, size)
    found = find_detail_layers(model, example)
    assert [(name, side) for name, _, side in found] == [("layer1", 16), ("layer2", 8)]
    assert lattice_shifts(size, [16, 8]) == [0, 8, 16, 24]
    assert lattice_shifts(64, [16, 8]) == [0, 4, 8, 12]
    assert lattice_shifts(224, [14]) == [0, 16]  # one map: steps of its own cell
    assert lattice_shifts(32, [32]) == [0]  # no stride, no lattice


def test_canvas_keeps_the_whole_image_on_black() -> None:
    images = torch.rand(2, 1, 8, 8) + 1.0
    placed = place_on_canvas(images, 3, 1, 4)
    assert placed.shape == (2, 1, 12, 12)
    assert torch.equal(placed[..., 3:11, 1:9], images)
    assert torch.equal(placed[0, 0, 0], torch.full((12,), float(images[0].min())))


def test_layercam_map_moves_with_the_image() -> None:
    """A map must follow the image: moved by one cell of the finest map (8 px), the de-aliased
    map moves with it; the raw LayerCAM map, tied to the network's stride-2 sampling grid, does
    not (measured: mean difference 0.02 against 0.11 of a [0, 1] map)."""
    torch.manual_seed(0)
    # A drawn head (the default starts at zero, where every map would be 0) made positive.
    cfg = compose(["model.head_init_scale=1"])
    model = model_from_config(cfg).eval()
    with torch.no_grad():  # positive evidence for class 1 (see _model)
        model.get_classifier().weight.abs_()
        model.get_classifier().bias.zero_()
    size, step = cfg.data.image_size, 8
    generator = torch.Generator().manual_seed(3)
    images = torch.zeros(3, 1, size, size)
    images[:, :, 32:96, 32:96] = torch.rand(3, 1, 64, 64, generator=generator) * 0.3 + 0.2
    for k in range(3):
        images[k, :, 40 + 9 * k : 46 + 9 * k, 44 + 5 * k : 54 + 5 * k] = 1.0
    moved = torch.zeros_like(images)
    moved[..., step:, step:] = images[..., :-step, :-step]

    def mismatch(dealias: bool) -> float:
        before = gradcam(model, images, 1, method="layercam", dealias=dealias)
        after = gradcam(model, moved, 1, method="layercam", dealias=dealias)
        inner = slice(24, size - 24)
        return float(
            np.abs(after[:, step:, step:] - before[:, :-step, :-step])[:, inner, inner].mean()
        )

    raw, dealiased = mismatch(False), mismatch(True)
    assert dealiased < 0.04 < 0.08 < raw, (dealiased, raw)


class _NormalisedImages(torch.utils.data.Dataset):
    """A dataset whose model input differs from the image as read (like local contrast
    normalisation): the grid must draw the heatmap over the image as read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index] * -3.0 + 1.0, int(self.labels[index])

    def as_read(self) -> TensorDataset:
        return TensorDataset(self.images, self.labels)


@pytest.mark.parametrize("layout", ["loader", "shuffled", "concat"])
def test_cam_grid_draws_over_the_image_as_read(tmp_path, monkeypatch, layout: str) -> None:
    from fedmsk import explain

    drawn: list[torch.Tensor] = []
    original = explain.overlay

    def recording(image, heatmap, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(torch.as_tensor(image))
        return original(image, heatmap, *args, **kwargs)

    explained: list[torch.Tensor] = []  # the model inputs the maps were computed on, in order
    original_cam = explain.gradcam

    def recording_cam(model, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        explained.extend(inputs)
        return original_cam(model, inputs, *args, **kwargs)

    monkeypatch.setattr(explain, "overlay", recording)
    monkeypatch.setattr(explain, "gradcam", recording_cam)
    model = _model("resnet18", 1)
    images = _images(10, 1, 32, seed=5)
    labels = torch.tensor([0, 1] * 5)
    if layout == "concat":  # the studies pass the held-out centers' datasets joined
        data: object = torch.utils.data.ConcatDataset(
            [_NormalisedImages(images[:6], labels[:6]), _NormalisedImages(images[6:], labels[6:])]
        )
    else:
        dataset = _NormalisedImages(images, labels)
        data = DataLoader(dataset, batch_size=4, shuffle=layout == "shuffled")
    grid = cam_grid_by_outcome(
        model, data, 0.5, ["normal", "fracture"], per_group=3, out_path=tmp_path / "c.png"
    )
    assert len(drawn) == sum(grid.counts.values()) > 0
    for image in drawn:
        as_read = any(torch.equal(image, raw) for raw in images)
        model_input = any(torch.equal(image, raw * -3.0 + 1.0) for raw in images)
        # an order that can't be matched (shuffled) falls back to the model's input
        expected = (False, True) if layout == "shuffled" else (True, False)
        assert (as_read, model_input) == expected
    # each map is drawn over its own image, not another of the same batch
    assert len(explained) == len(drawn)
    for model_input, image in zip(explained, drawn, strict=True):
        own = model_input if layout == "shuffled" else (model_input - 1.0) / -3.0
        assert torch.allclose(image, own)
