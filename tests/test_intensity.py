"""Per-image input normalisation (fedmsk.data.intensity): what local contrast normalisation
keeps and removes, and how a run names it."""

from __future__ import annotations

import math

import pytest
import torch

from fedmsk.config import DataConfig, ExperimentConfig, compose, describe_input
from fedmsk.data.intensity import InputNorm, local_contrast_normalize, standardize_image


def _bone_with_a_line(side: int = 64) -> torch.Tensor:
    """A bright band (bone) on a dark field, a thin darker line across it, a little texture."""
    generator = torch.Generator().manual_seed(0)
    image = torch.full((1, side, side), 0.05)
    image[:, :, side // 4 : 3 * side // 4] = 0.7
    image[:, side // 2, side // 4 : 3 * side // 4] = 0.62
    return (image + 0.01 * torch.randn(image.shape, generator=generator)).clamp(0, 1)


def test_a_smooth_contrast_curve_changes_the_normalised_image_far_less_than_the_raw_one() -> None:
    image = _bone_with_a_line()
    curved = image.clamp(0, 1) ** 0.6  # a center with a brighter, flatter curve
    raw_change = (curved - image).abs().mean() / image.std()
    lcn = local_contrast_normalize(image, 4.0, 0.02)
    lcn_curved = local_contrast_normalize(curved, 4.0, 0.02)
    lcn_change = (lcn_curved - lcn).abs().mean() / lcn.std()
    assert float(lcn_change) < 0.5 * float(raw_change)


def test_a_local_gain_is_removed_where_the_image_varies_more_than_the_floor() -> None:
    image = _bone_with_a_line()
    lcn = local_contrast_normalize(image, 4.0, 1e-4)
    gained = local_contrast_normalize(image * 0.5, 4.0, 1e-4)
    assert torch.allclose(lcn, gained, atol=0.05)


def test_the_fracture_line_stays_darker_than_the_bone_around_it() -> None:
    image = _bone_with_a_line()
    lcn = local_contrast_normalize(image, 4.0, 0.02)
    side = image.shape[-1]
    line = lcn[0, side // 2, side // 3 : 2 * side // 3].mean()
    bone = lcn[0, side // 2 - 6, side // 3 : 2 * side // 3].mean()
    assert float(line) < float(bone) - 1.0


def test_the_floor_keeps_a_flat_region_near_zero_rather_than_amplified_noise() -> None:
    flat = torch.full((1, 48, 48), 0.3) + 1e-3 * torch.randn(1, 48, 48)
    assert float(local_contrast_normalize(flat, 4.0, 0.02).abs().max()) < 0.5
    assert float(local_contrast_normalize(flat, 4.0, 1e-5).abs().max()) > 1.0


def test_shape_dtype_channels_and_small_images_are_kept() -> None:
    colour = torch.rand(3, 20, 30)
    out = local_contrast_normalize(colour, 4.0, 0.02)
    assert out.shape == colour.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    tiny = torch.rand(1, 6, 6)  # smaller than the 25-tap kernel's reach
    assert local_contrast_normalize(tiny, 4.0, 0.02).shape == tiny.shape
    # channels are normalised on their own
    assert torch.allclose(out[1], local_contrast_normalize(colour[1:2], 4.0, 0.02)[0], atol=1e-6)


@pytest.mark.parametrize(("sigma", "floor"), [(0.0, 0.02), (-1.0, 0.02), (4.0, 0.0)])
def test_a_sigma_or_floor_that_is_not_positive_is_refused(sigma: float, floor: float) -> None:
    with pytest.raises(ValueError, match="local contrast"):
        local_contrast_normalize(torch.rand(1, 16, 16), sigma, floor)


def test_the_config_refuses_a_negative_sigma_and_names_the_setting() -> None:
    with pytest.raises(Exception, match="data.local_contrast"):
        compose(["data.local_contrast=-2"])


def test_input_norm_applies_local_contrast_then_standardisation_and_says_so() -> None:
    image = _bone_with_a_line()
    both = InputNorm(local_contrast=4.0, standardize=True)
    expected = standardize_image(local_contrast_normalize(image, 4.0, 0.02))
    assert torch.allclose(both(image), expected)
    assert InputNorm()(image) is image
    assert both.describe() == (
        "local contrast, sigma 4 px, floor 0.02, then standardised per image"
    )
    data = DataConfig(local_contrast=4.0)
    assert InputNorm.from_config(data) == InputNorm(local_contrast=4.0)
    cfg = ExperimentConfig(data=data)
    assert describe_input(cfg) == "local contrast, sigma 4 px, floor 0.02"
    assert describe_input(ExperimentConfig(data=DataConfig())) == "none (window to 0 to 1 only)"
    assert not math.isnan(float(both(image).mean()))
