"""fedmsk.training: one local round (fit) and per-image evaluation, on tiny synthetic data."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmsk.config import TrainConfig
from fedmsk.models import create_model, get_arrays, set_arrays
from fedmsk.training import (
    EvalResult,
    FitResult,
    PrivacyHook,
    build_scheduler,
    class_weights,
    evaluate,
    fit,
    resolve_device,
    seed_everything,
)

SIZE = 32
CFG = TrainConfig(
    local_epochs=1,
    batch_size=8,
    lr=0.05,
    optimizer="sgd",
    class_weighting="none",
    precision="fp32",
    device="cpu",
    num_threads=1,
)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def separable_data(n: int = 48, seed: int = 0, positives: float = 0.5) -> TensorDataset:
    """Class 1 images are bright, class 0 images dark: a model that learns anything separates."""
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=gen) < positives).long()
    images = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=gen)
    images += (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    return TensorDataset(images, labels)


def loader_of(data: TensorDataset, shuffle: bool = True, batch_size: int = 8) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle)


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("tiny", num_classes=2, in_chans=1)


def test_fit_reduces_loss_on_separable_data() -> None:
    seed_everything(0)
    data = separable_data()
    model = tiny()
    before = evaluate(model, loader_of(data, shuffle=False))
    result = fit(model, loader_of(data), replace(CFG, local_epochs=4), num_classes=2)
    after = evaluate(model, loader_of(data, shuffle=False))
    assert isinstance(result, FitResult)
    assert result.num_examples == len(data)
    assert result.steps == 4 * math.ceil(len(data) / 8)
    assert result.seconds > 0 and result.images_per_second > 0
    assert result.epsilon is None
    assert math.isfinite(result.mean_loss)
    assert after.loss < 0.5 * before.loss
    assert (after.probs.argmax(1) == after.labels).mean() > 0.9


def test_fit_places_the_augmentation_at_the_runs_progress() -> None:
    """A round that starts 30 % into the run trains with the intensity ramp at 30 % / 50 %:
    the ramp follows the run's global step, as the learning rate does, not the round's."""
    from fedmsk.data.augment import AugmentConfig, SeededAugment
    from fedmsk.training import RunSchedule

    class Augmented(TensorDataset):
        transform = SeededAugment(AugmentConfig(intensity_warmup=0.5), seed=0)

    data = separable_data()
    dataset = Augmented(*data.tensors)
    fit(tiny(), loader_of(dataset), replace(CFG, max_steps=1), 2, schedule=RunSchedule(30, 100))
    assert float(dataset.transform.intensity) == pytest.approx(0.6)
    fit(tiny(), loader_of(dataset), replace(CFG, max_steps=1), 2, schedule=RunSchedule(70, 100))
    assert float(dataset.transform.intensity) == 1.0


def test_max_steps_caps_the_round_and_threads_are_restored() -> None:
    torch.set_num_threads(1)
    result = fit(tiny(), loader_of(separable_data()), replace(CFG, max_steps=2, num_threads=2), 2)
    assert result.steps == 2
    assert result.images_per_second == pytest.approx(16 / result.seconds)
    assert torch.get_num_threads() == 1


def _distance(model: nn.Module, anchor: dict[str, np.ndarray]) -> float:
    now = get_arrays(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return float(sum(np.sum((now[n] - anchor[n]) ** 2) for n in names))


def test_fedprox_term_pulls_toward_global_weights() -> None:
    data = separable_data()
    global_arrays = get_arrays(tiny(seed=5))
    distances = {}
    for mu in (0.0, 1.0):
        model = tiny(seed=5)
        set_arrays(model, global_arrays)
        torch.manual_seed(0)
        cfg = replace(CFG, local_epochs=3, proximal_mu=mu)
        fit(model, loader_of(data), cfg, 2, global_arrays=global_arrays)
        distances[mu] = _distance(model, global_arrays)
    assert distances[0.0] > 0
    assert distances[1.0] < 0.8 * distances[0.0]


def test_fedprox_without_global_arrays_is_plain_training() -> None:
    data = separable_data()
    results = []
    for mu in (0.0, 1.0):
        model = tiny(seed=5)
        torch.manual_seed(0)
        fit(model, loader_of(data), replace(CFG, proximal_mu=mu), 2)
        results.append(get_arrays(model))
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])


def test_class_weights_are_inverse_frequency() -> None:
    weights = class_weights([30, 10, 0], 3)
    assert weights.tolist() == pytest.approx([40 / 60, 40 / 20, 1.0])
    with pytest.raises(ValueError, match="2 entries but the task has 3"):
        class_weights([1, 2], 3)


def test_class_weighting_changes_the_loss_exactly_as_weighted_ce() -> None:
    data = separable_data(n=16, positives=0.25)
    counts = [int((data.tensors[1] == c).sum()) for c in range(2)]
    assert counts[0] != counts[1]
    frozen = replace(CFG, lr=0.0, momentum=0.0, weight_decay=0.0, max_steps=1)
    loader = loader_of(data, shuffle=False, batch_size=16)
    model = tiny()
    model.train()
    with torch.no_grad():
        logits = model(data.tensors[0])
    plain_expected = nn.functional.cross_entropy(logits, data.tensors[1]).item()
    weighted_expected = nn.functional.cross_entropy(
        logits, data.tensors[1], weight=class_weights(counts, 2)
    ).item()
    assert abs(plain_expected - weighted_expected) > 1e-3
    plain = fit(tiny(), loader, frozen, 2)
    weighted = fit(tiny(), loader, replace(frozen, class_weighting="loss"), 2, class_counts=counts)
    assert plain.mean_loss == pytest.approx(plain_expected, rel=1e-4)
    assert weighted.mean_loss == pytest.approx(weighted_expected, rel=1e-4)


def test_class_weighting_without_counts_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"train.class_weighting='loss'.*class_counts"):
        fit(tiny(), loader_of(separable_data()), replace(CFG, class_weighting="loss"), 2)


@pytest.mark.parametrize(
    ("field", "value"),
    [("optimizer", "rmsprop"), ("scheduler", "linear"), ("class_weighting", "focal")],
)
def test_bad_settings_are_named(field: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"train.{field}={value!r}"):
        fit(tiny(), loader_of(separable_data()), replace(CFG, **{field: value}), 2)


def test_adamw_and_schedulers_train() -> None:
    for scheduler in ("cosine", "step"):
        cfg = replace(CFG, optimizer="adamw", lr=1e-3, scheduler=scheduler, max_steps=3)
        result = fit(tiny(), loader_of(separable_data()), cfg, 2)
        assert result.steps == 3 and math.isfinite(result.mean_loss)


def test_schedules_decay_over_the_round() -> None:
    param = nn.Parameter(torch.zeros(1))
    lrs = {}
    for name in ("none", "cosine", "step"):
        opt = torch.optim.SGD([param], lr=1.0)
        sched = build_scheduler(opt, name, total_steps=8)
        seen = []
        for _ in range(8):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            if sched is not None:
                sched.step()
        lrs[name] = seen
    assert lrs["none"] == [1.0] * 8
    assert lrs["cosine"][0] == 1.0 and lrs["cosine"][-1] < 0.05
    assert lrs["step"] == pytest.approx([1.0] * 4 + [0.1] * 2 + [0.01] * 2)


def test_evaluate_returns_softmax_per_image_in_order() -> None:
    data = separable_data(n=13)
    model = tiny()
    result = evaluate(model, loader_of(data, shuffle=False, batch_size=5), device="cpu")
    assert isinstance(result, EvalResult)
    assert result.num_examples == 13
    assert result.probs.shape == (13, 2) and result.probs.dtype == np.float32
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.labels.dtype == np.int64
    np.testing.assert_array_equal(result.labels, data.tensors[1].numpy())
    assert not model.training
    with torch.no_grad():
        logits = model(data.tensors[0])
    np.testing.assert_allclose(result.probs, torch.softmax(logits, 1).numpy(), atol=1e-5)
    expected = nn.functional.cross_entropy(logits, data.tensors[1]).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_evaluate_empty_loader() -> None:
    empty = TensorDataset(torch.zeros(0, 1, SIZE, SIZE), torch.zeros(0, dtype=torch.long))
    result = evaluate(tiny(), DataLoader(empty, batch_size=4))
    assert result.num_examples == 0 and result.probs.shape == (0, 2) and math.isnan(result.loss)


def _run(seed: int) -> tuple[FitResult, dict[str, np.ndarray]]:
    seed_everything(seed)
    model = create_model("tiny", num_classes=2, in_chans=1)
    result = fit(model, loader_of(separable_data()), replace(CFG, max_steps=4), 2)
    return result, get_arrays(model)


def test_fixed_seed_is_deterministic() -> None:
    first, arrays_a = _run(7)
    second, arrays_b = _run(7)
    _, arrays_c = _run(8)
    assert first.mean_loss == second.mean_loss
    assert all(np.array_equal(arrays_a[k], arrays_b[k]) for k in arrays_a)
    assert not all(np.array_equal(arrays_a[k], arrays_c[k]) for k in arrays_a)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="train.device='gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


class FakePrivacy:
    """Records the calls fit makes; wraps nothing, which is enough to test the contract."""

    def __init__(self, budget_left: bool = True, fail_on_step: int | None = None) -> None:
        self.budget_left = budget_left
        self.fail_on_step = fail_on_step
        self.calls: list[tuple] = []

    def can_train(self) -> bool:
        self.calls.append(("can_train",))
        return self.budget_left

    def attach(self, model, optimizer, loader):
        self.calls.append(("attach", type(optimizer).__name__))
        if self.fail_on_step is None:
            return model, optimizer, loader
        fail_on = self.fail_on_step

        def failing():
            for index, batch in enumerate(loader):
                if index == fail_on:
                    raise RuntimeError("boom")
                yield batch

        class Failing:
            def __iter__(self):
                return failing()

            def __len__(self):
                return len(loader)

            dataset = loader.dataset

        return model, optimizer, Failing()

    def after_fit(self, steps: int) -> float:
        self.calls.append(("after_fit", steps))
        return 0.5 * steps


def test_privacy_hook_contract() -> None:
    hook = FakePrivacy()
    assert isinstance(hook, PrivacyHook)
    result = fit(tiny(), loader_of(separable_data()), replace(CFG, max_steps=3), 2, privacy=hook)
    assert hook.calls == [("can_train",), ("attach", "SGD"), ("after_fit", 3)]
    assert result.epsilon == pytest.approx(1.5)


def test_spent_budget_means_no_training() -> None:
    hook = FakePrivacy(budget_left=False)
    model = tiny()
    before = get_arrays(model)
    result = fit(model, loader_of(separable_data()), CFG, 2, privacy=hook)
    assert hook.calls == [("can_train",), ("after_fit", 0)]
    assert result.steps == 0 and result.num_examples == 0 and result.epsilon == 0.0
    after = get_arrays(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_privacy_spend_is_recorded_when_training_fails() -> None:
    hook = FakePrivacy(fail_on_step=2)
    with pytest.raises(RuntimeError, match="boom"):
        fit(tiny(), loader_of(separable_data()), CFG, 2, privacy=hook)
    assert hook.calls[-1] == ("after_fit", 2)


class RewritingOptimizer(torch.optim.Optimizer):
    """Mimics Opacus' DPOptimizer: ``pre_step`` replaces every gradient (here by zeros, the way
    clipping-plus-noise replaces it), then ``original_optimizer.step()`` applies it."""

    def __init__(self, original: torch.optim.Optimizer) -> None:
        self.original_optimizer = original
        self.param_groups = original.param_groups
        self.defaults = original.defaults
        self.state = original.state
        self.pre_steps = 0

    def pre_step(self) -> bool:
        self.pre_steps += 1
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        return True

    def step(self, closure=None):
        if self.pre_step():
            return self.original_optimizer.step()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none)


class RewritingPrivacy(FakePrivacy):
    def attach(self, model, optimizer, loader):
        self.optimizer = RewritingOptimizer(optimizer)
        return model, self.optimizer, loader


def test_fedprox_survives_an_optimizer_that_rewrites_gradients() -> None:
    data = separable_data(n=16)
    global_arrays = get_arrays(tiny(seed=5))
    distances = {}
    for mu in (0.0, 1.0):
        model = tiny(seed=6)
        start = _distance(model, global_arrays)
        hook = RewritingPrivacy()
        cfg = replace(CFG, max_steps=2, proximal_mu=mu, weight_decay=0.0, momentum=0.0)
        fit(model, loader_of(data), cfg, 2, global_arrays=global_arrays, privacy=hook)
        assert hook.optimizer.pre_steps == 2
        distances[mu] = _distance(model, global_arrays) / start
    assert distances[0.0] == pytest.approx(1.0)  # data gradients erased: nothing moves
    assert distances[1.0] < 0.99  # the proximal gradient, added after pre_step, still acts


def test_private_class_weighted_loss_is_a_sum_of_per_image_terms() -> None:
    from fedmsk.training import _loss_fn

    cfg = TrainConfig(class_weighting="loss")
    criterion = _loss_fn(cfg, 2, [30, 10], torch.device("cpu"), private=True)
    logits = torch.randn(6, 2)
    target = torch.tensor([0, 1, 1, 0, 0, 1])
    whole = criterion(logits, target)
    # Each image's term does not depend on which other images share its batch.
    parts = sum(criterion(logits[i : i + 1], target[i : i + 1]) for i in range(6)) / 6
    torch.testing.assert_close(whole, parts)
    plain = _loss_fn(cfg, 2, [30, 10], torch.device("cpu"), private=False)
    assert not torch.allclose(plain(logits, target), whole)


def test_under_dp_the_loss_does_not_depend_on_the_private_class_counts() -> None:
    from fedmsk.training import _loss_fn

    cfg = TrainConfig(class_weighting="loss")
    logits, target = torch.tensor([[2.0, -1.0], [0.5, 0.3]]), torch.tensor([1, 0])
    private = [
        _loss_fn(cfg, 2, counts, torch.device("cpu"), private=True)
        for counts in ([90, 10], [10, 90])
    ]
    assert float(private[0](logits, target)) == float(private[1](logits, target))
    weighted = _loss_fn(cfg, 2, [90, 10], torch.device("cpu"), private=False)
    assert float(weighted(logits, target)) != float(private[0](logits, target))
