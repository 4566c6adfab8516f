"""Lesion boxes from the generator and the pointing game that scores heatmaps against them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedmsk.config import compose
from fedmsk.data.dataset import build_site_loaders
from fedmsk.data.federation import load_federation
from fedmsk.data.manifest import read_manifest
from fedmsk.data.synthetic import generate_federation, lesion_box, read_lesions
from fedmsk.data.synthetic_sites import (
    acquire_xray,
    acquire_xray_with_lesion,
    make_site_profile,
)
from fedmsk.data.synthetic_xray import fracture_anatomy, fracture_render
from fedmsk.explain import find_detail_layer
from fedmsk.models import model_from_config
from fedmsk.pointing import (
    binomial_tail,
    box_in_input,
    chance_rate,
    peak_hits,
    pointing_game,
    score_site,
)
from fedmsk.site_runtime import all_images_loader

# -- the generator knows where the fracture is -----------------------------------------------


def _plain_fracture(seed: int) -> dict:
    anatomy = fracture_anatomy(np.random.default_rng(seed), 1)
    # nothing drawn after the fracture line, so label 1 and 0 differ by the line alone
    anatomy.update(frac_step=0.0, skin_fold=False, vessel=False, canal=False, growth_lines=False)
    return anatomy


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fracture_lesion_mask_holds_the_drawn_line(seed: int) -> None:
    anatomy = _plain_fracture(seed)
    broken = fracture_render(anatomy, 1, "ap", np.random.default_rng(seed), 96)
    whole = fracture_render(anatomy, 0, "ap", np.random.default_rng(seed), 96)
    assert broken.lesion is not None and whole.lesion is None
    difference = np.abs(broken.signal - whole.signal)
    assert difference.sum() > 0
    inside = difference[broken.lesion > 0.05].sum() / difference.sum()
    assert inside > 0.95
    # and the mask is a line, not the whole bone
    assert 0.001 < (broken.lesion > 0.5).mean() < 0.1


def test_acquisition_carries_the_mask_without_changing_the_image() -> None:
    profile = make_site_profile(
        rng=np.random.default_rng(4),
        index=1,
        role="train",
        modality="xray",
        web=False,
        num_classes=2,
        size_range=(96, 128),
        scale=1.0,
    )
    anatomy = _plain_fracture(5)
    drawn = fracture_render(anatomy, 1, "ap", np.random.default_rng(6), 128)
    plain = acquire_xray(drawn.signal, profile, np.random.default_rng(7), laterality="R")
    image, placed = acquire_xray_with_lesion(
        drawn.signal, drawn.lesion, profile, np.random.default_rng(7), laterality="R"
    )
    np.testing.assert_array_equal(plain, image)
    assert placed is not None and placed.shape == image.shape
    box = lesion_box(placed)
    assert box is not None
    top, left, bottom, right = box
    assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1
    assert (bottom - top) * (right - left) < 0.5


@pytest.fixture(scope="module")
def fracture_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lesions") / "fed"
    generate_federation(root, "xray_fracture", centers=3, seed=11, scale=0.3)
    return root


def test_generated_sites_list_a_box_for_their_fractures_only(fracture_federation: Path) -> None:
    federation = load_federation(fracture_federation)
    boxed = 0
    for site in federation.sites:
        folder = federation.site_dir(site.alias)
        boxes = read_lesions(folder)
        labels = {row.image: row.label for row in read_manifest(folder)}
        assert set(boxes) <= {image for image, label in labels.items() if label == "fracture"}
        boxed += len(boxes)
        for top, left, bottom, right in boxes.values():
            assert 0 <= top < bottom <= 1 and 0 <= left < right <= 1
    assert boxed > 5


def test_score_site_plays_the_game_on_real_dicom_images(fracture_federation: Path) -> None:
    cfg = compose(
        [f"data.root={fracture_federation}", "data.synthetic=false", "data.image_size=48"]
    )
    federation = load_federation(fracture_federation)
    alias = next(s.alias for s in federation.sites if read_lesions(federation.site_dir(s.alias)))
    folder = federation.site_dir(alias)
    loaders = build_site_loaders(folder, cfg.task, cfg.data, cfg.train, seed=0)
    loader = all_images_loader(loaders, cfg)
    model = model_from_config(cfg)
    result = score_site(model, loader.dataset, folder, threshold=0.0)  # every positive counts
    usable = {item.path.relative_to(folder).as_posix() for item in loader.dataset.items}
    assert result is not None
    assert result.n == len(set(read_lesions(folder)) & usable)
    assert 0 <= result.hits <= result.n and 0 < result.chance < 0.5


# -- the game itself -------------------------------------------------------------------------


def test_boxes_follow_the_square_padding_of_the_cache() -> None:
    # a tall 200 x 100 image sits in the middle of a 200 x 200 square, then becomes 64 x 64
    assert box_in_input((0.0, 0.0, 1.0, 1.0), 200, 100, 64) == (0.0, 16.0, 64.0, 48.0)
    top, left, bottom, right = box_in_input((0.5, 0.5, 0.75, 1.0), 100, 200, 64)
    assert (top, left, bottom, right) == (32.0, 32.0, 40.0, 64.0)


def test_peaks_chance_and_binomial_tail() -> None:
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 4, 4] = 1.0  # inside the box below
    maps[1, 15, 15] = 1.0  # far from it
    boxes = [(3.0, 3.0, 6.0, 6.0)] * 2
    assert peak_hits(maps, boxes, tolerance=0.0) == [True, False]
    assert chance_rate([(0.0, 0.0, 8.0, 8.0)], 16, 0.0) == pytest.approx(0.25)
    assert chance_rate([(0.0, 0.0, 8.0, 8.0)], 16, 1.0) == pytest.approx(81 / 256)
    assert binomial_tail(0, 10, 0.1) == pytest.approx(1.0)
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5**10)


class _Threshold(nn.Module):
    """Evidence only where the input exceeds ``level`` inside ``mask``."""

    def __init__(self, mask: torch.Tensor, level: float) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x * self.mask - self.level)


def _probe_model(mask: torch.Tensor, level: float) -> nn.Module:
    conv = nn.Conv2d(1, 4, 1, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
        head.bias.zero_()
    return nn.Sequential(
        _Threshold(mask, level), conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head
    )


def _images_with_lesions(n: int, size: int = 32) -> tuple[torch.Tensor, list[tuple]]:
    rng = np.random.default_rng(0)
    images = rng.normal(0.2, 0.03, size=(n, 1, size, size)).astype(np.float32)
    images[:, :, :6, :6] = 0.3  # a marker in the corner of every image, like "L"/"R"
    boxes = []
    for k in range(n):
        top, left = (int(v) for v in rng.integers(10, size - 6, size=2))
        images[k, :, top : top + 4, left : left + 4] = 1.0
        boxes.append((float(top), float(left), float(top + 4), float(left + 4)))
    return torch.from_numpy(images), boxes


def test_pointing_game_tells_a_lesion_reader_from_a_marker_reader() -> None:
    """The check can fail: a model whose evidence is the corner marker scores at chance."""
    images, boxes = _images_with_lesions(20)
    everywhere = torch.ones(1, 32, 32)
    corner = torch.zeros(1, 32, 32)
    corner[:, :6, :6] = 1.0
    lesion_reader = _probe_model(everywhere, 0.5)
    marker_reader = _probe_model(corner, 0.1)
    good = pointing_game(lesion_reader, images, boxes)
    bad = pointing_game(marker_reader, images, boxes)
    assert good.hits == good.n == 20 and good.beats_chance
    assert bad.hits == 0 and not bad.beats_chance
    assert 0.0 < good.chance == bad.chance < 0.2


def test_detail_layer_is_finer_than_the_last_stage_of_a_resnet() -> None:
    cfg = compose(["data.image_size=64"])
    model = model_from_config(cfg)
    example = torch.zeros(1, cfg.data.in_chans, 64, 64)
    name, module = find_detail_layer(model, example)
    seen: dict[str, torch.Size] = {}

    def keep_shape(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        seen["shape"] = output.shape

    handle = module.register_forward_hook(keep_shape)
    model.eval()
    with torch.no_grad():
        model(example)
    handle.remove()
    assert min(seen["shape"][-2:]) >= 8, (name, seen["shape"])


def test_device_and_dislocation_renderers_say_where_the_finding_is() -> None:
    from fedmsk.data.synthetic_xray import (
        dislocation_anatomy,
        dislocation_render,
        implant_anatomy,
        implant_render,
    )

    for label in range(6):
        anatomy = implant_anatomy(np.random.default_rng(label), label)
        drawn = implant_render(anatomy, label, "ap", np.random.default_rng(9), 96)
        assert drawn.lesion is not None and 0.005 < (drawn.lesion > 0.5).mean() < 0.5
    dislocated = dislocation_render(
        dislocation_anatomy(np.random.default_rng(1), 1), 1, "hip", np.random.default_rng(2), 96
    )
    normal = dislocation_render(
        dislocation_anatomy(np.random.default_rng(1), 0), 0, "hip", np.random.default_rng(2), 96
    )
    assert dislocated.lesion is not None and normal.lesion is None


def test_games_over_several_sites_add_up() -> None:
    from fedmsk.pointing import PointingResult, combine

    first = PointingResult(10, 6, 0.1, 0.0, "layercam")
    second = PointingResult(30, 6, 0.2, 0.0, "layercam")
    total = combine([first, PointingResult(0, 0, 0.0, 1.0, "layercam"), second])
    assert total is not None and (total.n, total.hits) == (40, 12)
    assert total.chance == pytest.approx(0.175)
    assert total.p_value == pytest.approx(binomial_tail(12, 40, 0.175))


def test_multiclass_sites_score_the_correctly_classified_images(tmp_path: Path) -> None:
    """Femoral devices: every image has a box (the implant); a model that always says class 0
    is right exactly on the class-0 images, and those are the ones scored."""
    root = tmp_path / "fed"
    generate_federation(root, "femoral_device_xray", centers=2, seed=3, scale=0.3)
    cfg = compose(
        [
            "task=femoral_device_xray",
            f"data.root={root}",
            "data.synthetic=false",
            "data.image_size=32",
        ]
    )
    federation = load_federation(root)
    folder = federation.site_dir(federation.sites[0].alias)
    loader = all_images_loader(build_site_loaders(folder, cfg.task, cfg.data, cfg.train, 0), cfg)
    head = nn.Linear(4, 6)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, 0, 0, 0, 0, 0]))
    model = nn.Sequential(
        nn.Conv2d(cfg.data.in_chans, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        head,
    )
    result = score_site(model, loader.dataset, folder, threshold=0.5)
    boxes = read_lesions(folder)
    class_zero = [
        item
        for item in loader.dataset.items
        if item.label == 0 and item.path.relative_to(folder).as_posix() in boxes
    ]
    assert result is not None and result.n == len(class_zero) > 0
