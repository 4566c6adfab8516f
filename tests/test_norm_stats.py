"""BatchNorm statistics measured at given weights and combined across sites exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedmsk.models import create_model, get_arrays, set_arrays
from fedmsk.norm_stats import (
    apply_to_arrays,
    combine,
    from_arrays,
    image_batches,
    measure_moments,
    to_arrays,
)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def images(n: int, shift: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=gen) + shift


def test_moments_are_those_of_the_layer_input_over_all_images() -> None:
    torch.manual_seed(0)
    model = TwoLayer()
    x = images(24, 0.5, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = measure_moments(model, [x[:10], x[10:]])
    with torch.no_grad():
        inputs = model.conv(x)
    expected_mean = inputs.mean(dim=(0, 2, 3)).double().numpy()
    expected_var = inputs.var(dim=(0, 2, 3), unbiased=False).double().numpy()
    np.testing.assert_allclose(moments["bn"].mean, expected_mean, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(moments["bn"].var, expected_var, rtol=1e-6)
    assert moments["bn"].count == 24 * 8 * 8
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was updated


def test_sites_combine_to_the_pooled_moments_with_the_between_site_variance() -> None:
    torch.manual_seed(0)
    model = TwoLayer()
    a, b = images(12, -2.0, 1), images(30, 3.0, 2)
    per_site = [measure_moments(model, [a]), measure_moments(model, [b])]
    wire = [from_arrays(to_arrays(m)) for m in per_site]  # what crosses the network
    pooled = measure_moments(model, [torch.cat([a, b])])
    joined = combine(wire)["bn"]
    np.testing.assert_allclose(joined.mean, pooled["bn"].mean, rtol=1e-9)
    np.testing.assert_allclose(joined.var, pooled["bn"].var, rtol=1e-9)
    naive = (12 * per_site[0]["bn"].var + 30 * per_site[1]["bn"].var) / 42
    # a plain average of variances drops the shift between the sites' means
    assert np.all(joined.var > naive) and np.any(joined.var > 2 * naive)


def test_statistics_written_into_a_resnet_match_its_batchnorm_layers() -> None:
    model = create_model("resnet18", num_classes=2, in_chans=1)
    x = torch.rand(16, 1, 32, 32)
    arrays = get_arrays(model)
    written = apply_to_arrays(arrays, measure_moments(model, image_batches([(x, None)], 12)))
    assert "bn1" in written and "layer4.1.bn2" in written
    set_arrays(model, arrays)
    assert not np.allclose(model.bn1.running_var.numpy(), 1.0)
    # running variance is stored unbiased, as BatchNorm keeps it
    moments = measure_moments(model, [x[:12]])["bn1"]
    expected = moments.var * moments.count / (moments.count - 1)
    np.testing.assert_allclose(model.bn1.running_var.numpy(), expected, rtol=1e-5)


def test_a_model_without_batchnorm_has_no_moments() -> None:
    gn = create_model("resnet18", num_classes=2, in_chans=1, dp_compatible=True)
    assert measure_moments(gn, [torch.rand(4, 1, 32, 32)]) == {}
    assert combine([]) == {}


def test_image_batches_stop_at_the_cap() -> None:
    batches = [(torch.zeros(5, 1, 2, 2), None) for _ in range(4)]
    sizes = [b.shape[0] for b in image_batches(batches, 12)]
    assert sizes == [5, 5, 2]
    assert sum(b.shape[0] for b in image_batches(batches, None)) == 20


@pytest.mark.parametrize("bad", [{"bn.count": np.array([3.0])}])
def test_incomplete_wire_arrays_fail(bad) -> None:
    with pytest.raises(KeyError):
        from_arrays(bad)
