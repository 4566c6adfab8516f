"""What a federated round must carry over: the run's schedule, the optimizer's moments, fixed
local steps, weight decay only where it belongs, and the number format a device trains in."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmsk.config import TrainConfig
from fedmsk.models import create_model, get_arrays
from fedmsk.precision import resolve_precision
from fedmsk.training import (
    COSINE_FLOOR,
    RunSchedule,
    build_optimizer,
    fit,
    lr_factor,
    planned_steps,
    seed_everything,
)

CFG = TrainConfig(
    batch_size=8,
    lr=1e-2,
    optimizer="adamw",
    class_weighting="none",
    precision="fp32",
    device="cpu",
    num_threads=1,
)


def data(n: int = 32, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < 0.5).long()
    images = 0.5 * torch.randn(n, 1, 16, 16, generator=gen) + labels.float().view(-1, 1, 1, 1)
    return TensorDataset(images, labels)


def fixed_order_loader(dataset: TensorDataset) -> DataLoader:
    return DataLoader(dataset, batch_size=8, shuffle=False)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny", num_classes=2, in_chans=1)


def test_lr_schedule_follows_the_global_step() -> None:
    total = 20
    whole = [lr_factor("cosine", t, total, warmup_steps=4) for t in range(total)]
    assert whole[0] == pytest.approx(0.25) and whole[3] == pytest.approx(1.0)
    assert whole[-1] == pytest.approx(COSINE_FLOOR)
    assert all(a >= b for a, b in zip(whole[3:], whole[4:], strict=False))
    # a round starting at step 10 continues the curve instead of restarting it
    assert lr_factor("cosine", 10, total, 4) == whole[10] < whole[4]
    with pytest.raises(ValueError, match="train.scheduler='linear'"):
        lr_factor("linear", 0, total)


def test_wsd_schedule_holds_the_rate_then_decays_over_its_share() -> None:
    total, warmup = 101, 5
    curve = [lr_factor("wsd", t, total, warmup, decay_fraction=0.3) for t in range(total)]
    assert curve[0] == pytest.approx(0.2) and curve[warmup - 1] == pytest.approx(1.0)
    stable_end = warmup + int(0.7 * (total - warmup - 1))
    assert all(f == 1.0 for f in curve[warmup : stable_end + 1])
    decay = curve[stable_end:]
    assert all(a >= b for a, b in zip(decay, decay[1:], strict=False)) and decay[1] < 1.0
    assert curve[-1] == pytest.approx(COSINE_FLOOR)
    # a shorter decay share holds the full rate longer
    assert lr_factor("wsd", 80, total, warmup, 0.1) == 1.0 > curve[80]
    with pytest.raises(ValueError, match="decay_fraction"):
        lr_factor("wsd", 0, total, warmup, decay_fraction=0.0)  # caught in the warm-up too


def test_rounds_with_carried_state_equal_one_uninterrupted_run() -> None:
    """Two rounds of 4 steps, moments and schedule carried, land where 8 steps in one go do."""
    dataset = data()
    cfg = replace(CFG, scheduler="cosine", warmup_fraction=0.25, local_steps=4)
    seed_everything(0)
    split = tiny()
    first = fit(split, fixed_order_loader(dataset), cfg, 2, schedule=RunSchedule(0, 8))
    fit(
        split,
        fixed_order_loader(dataset),
        cfg,
        2,
        schedule=RunSchedule(4, 8),
        optimizer_state=first.optimizer_state,
    )
    seed_everything(0)
    whole = tiny()
    fit(whole, fixed_order_loader(dataset), replace(cfg, local_steps=8), 2)
    a, b = get_arrays(split), get_arrays(whole)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)

    seed_everything(0)
    fresh = tiny()
    fit(fresh, fixed_order_loader(dataset), cfg, 2, schedule=RunSchedule(0, 8))
    fit(fresh, fixed_order_loader(dataset), cfg, 2, schedule=RunSchedule(4, 8))
    c = get_arrays(fresh)
    assert not all(np.allclose(c[k], b[k], atol=1e-6) for k in c)


def test_local_steps_are_the_same_at_every_site_size() -> None:
    cfg = replace(CFG, local_steps=5)
    small = DataLoader(data(n=16), batch_size=8, shuffle=True, drop_last=True)
    large = DataLoader(data(n=160), batch_size=8, shuffle=True, drop_last=True)
    assert planned_steps(small, cfg) == planned_steps(large, cfg) == 5
    assert fit(tiny(), small, cfg, 2).steps == 5  # two images' worth of epochs, reshuffled
    assert fit(tiny(), large, cfg, 2).steps == 5
    assert planned_steps(large, replace(cfg, local_steps=None)) == 20


def test_no_weight_decay_on_norm_scales_and_biases() -> None:
    model = create_model("resnet18", num_classes=2, in_chans=1)
    optimizer = build_optimizer(model, replace(CFG, weight_decay=0.05))
    by_decay = {g["weight_decay"]: g["params"] for g in optimizer.param_groups}
    assert all(p.ndim > 1 for p in by_decay[0.05])
    assert all(p.ndim <= 1 for p in by_decay[0.0])
    norm_scales = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert norm_scales <= {id(p) for p in by_decay[0.0]}
    assert id(model.fc.bias) in {id(p) for p in by_decay[0.0]}


def test_state_from_another_architecture_is_ignored() -> None:
    dataset = data()
    other = fit(tiny(), fixed_order_loader(dataset), CFG, 2).optimizer_state
    big = create_model("resnet18", num_classes=2, in_chans=1)
    result = fit(
        big, fixed_order_loader(dataset), replace(CFG, max_steps=1), 2, optimizer_state=other
    )
    assert result.steps == 1


def test_precision_auto_needs_native_bf16_and_a_validated_model(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr("fedmsk.precision.cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "auto", cpu, "resnet18").name == "fp32"
    monkeypatch.setattr("fedmsk.precision.cpu_has_native_bf16", lambda: True)
    chosen = resolve_precision("auto", "auto", cpu, "resnet18")
    assert chosen.name == "bf16" and chosen.channels_last
    assert resolve_precision("auto", "auto", cpu, "efficientnet_b0").name == "fp32"
    assert resolve_precision("auto", "auto", cpu, "resnet18", private=True).name == "fp32"
    assert resolve_precision("fp32", "auto", cpu, "resnet18").channels_last is False
    with pytest.raises(ValueError, match="train.precision='half'"):
        resolve_precision("half", "auto", cpu, "resnet18")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("fp16", "auto", cpu, "resnet18")


def test_bf16_round_trains_and_reports_its_precision() -> None:
    cfg = replace(CFG, precision="bf16", channels_last="on", max_steps=3)
    result = fit(tiny(), fixed_order_loader(data()), cfg, 2)
    assert result.precision == "bf16" and result.steps == 3
    assert np.isfinite(result.mean_loss)
