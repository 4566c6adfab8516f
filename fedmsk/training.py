"""One local round of training, and evaluation that returns per-image scores.

Both functions are plain PyTorch over any ``nn.Module`` and ``DataLoader`` yielding
``(images, labels)``; they know nothing of Flower, of sites or of files, so the same code runs a
pooled baseline, a single site, or a federated client. Per-image outputs of :func:`evaluate` stay
in the process that owns the images: only aggregates computed from them may leave a node.

The hot loop of :func:`fit` is kept as close to a bare PyTorch loop as possible (no per-step host
synchronisation, the proximal term applied to gradients instead of through autograd), because
``simulations/bench_fit.py`` holds it to >= 0.95 of a bare loop's throughput.

A federated run calls :func:`fit` once per round, so what must outlive a round is passed in and
out explicitly: the learning-rate schedule follows the run's global step (:class:`RunSchedule`),
not the round, and the optimizer's state (Adam moments, momentum buffers) is returned in
:attr:`FitResult.optimizer_state` for the caller to keep on the node and hand back next round.
Restarting AdamW every 4-12 steps decorrelates the sites' updates (measured: update cosine 0.19
fresh vs 0.75 carried over, two sites, six steps from the same weights).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedmsk.config import TrainConfig
from fedmsk.data.augment import set_augment_progress
from fedmsk.precision import Precision, resolve_precision
from fedmsk.threads import training_threads

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "cosine", "step", "wsd")
# The lowest learning rate of the cosine schedule, as a fraction of train.lr: a federation's
# last rounds still move the model a little instead of freezing it.
COSINE_FLOOR = 0.02
CLASS_WEIGHTINGS = ("none", "loss", "sampler")


@runtime_checkable
class PrivacyHook(Protocol):
    """What :func:`fit` needs from a differential-privacy session (``fedmsk.privacy.DPSession``).

    The call order within one :func:`fit` is::

        if not hook.can_train():          # budget spent: no training, no attach
            epsilon = hook.after_fit(0)
        else:
            model, optimizer, loader = hook.attach(model, optimizer, loader)
            try:    ...train with the returned trio...
            finally: epsilon = hook.after_fit(steps)

    ``attach(model, optimizer, loader)`` receives the caller's model (already on the training
    device, in train mode), a fresh optimizer over its parameters and the site's loader, and
    returns the wrapped trio (e.g. Opacus ``GradSampleModule``, ``DPOptimizer``, Poisson-sampling
    ``DPDataLoader``). The wrapped model must share its parameters with the caller's model: fit
    trains through the wrapper and the caller reads weights from its own object afterwards.
    The returned loader may yield empty batches (Poisson sampling); fit still runs forward,
    backward and ``optimizer.step()`` on them, so the noise of that step is added and counted.

    ``can_train()`` is False once the site's budget (target epsilon) is spent.

    ``after_fit(steps)`` is called exactly once per fit, also when training raised, with the
    number of optimizer steps actually taken (0 when ``can_train()`` was False). It must record
    the spend, persist the accountant state, undo what ``attach`` added to the caller's model
    (hooks, ``grad_sample`` attributes) so the plain model can be evaluated, serialised and
    attached again next round, and return the epsilon spent so far by this site in this run.

    fit trains in fp32 whenever a hook is given: per-sample gradients are computed in fp32.
    """

    def attach(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, Optimizer, DataLoader]: ...

    def can_train(self) -> bool: ...

    def after_fit(self, steps: int) -> float: ...


@dataclass(frozen=True)
class RunSchedule:
    """Where one :func:`fit` call's steps sit in the whole run.

    ``start_step``: optimizer steps the run took before this call (round r of a federation
    with K local steps: ``(r - 1) * K``; epoch e of pooled training: ``(e - 1) * len(loader)``).
    ``total_steps``: the steps the whole run plans. The learning rate at a step depends only on
    these two numbers, so a schedule decays over the federation instead of restarting in every
    round, and a resumed run continues it exactly.
    """

    start_step: int
    total_steps: int


@dataclass
class FitResult:
    """Summary of one local round.

    All fields but ``optimizer_state`` are aggregates that may leave a node.
    ``num_examples`` is the size of the training set (``len(loader.dataset)``); 0 when no
    training happened (privacy budget spent). ``mean_loss`` is the example-weighted mean of the
    optimised (possibly class-weighted) loss, without the proximal term; NaN when no step ran.
    ``images_per_second`` counts the images actually processed. ``optimizer_state`` is the
    optimizer's ``state_dict()`` after the round: node-local, kept for the next round, never
    sent. ``precision`` names the number format the round trained in.
    """

    num_examples: int
    mean_loss: float
    steps: int
    seconds: float
    images_per_second: float
    epsilon: float | None = None
    optimizer_state: dict | None = field(default=None, repr=False)
    precision: str = "fp32"


@dataclass
class EvalResult:
    """Per-image outputs of :func:`evaluate`. These arrays must not leave the node.

    ``labels``: int64 (N,); ``probs``: float32 (N, C) softmax; ``loss``: mean unweighted
    cross-entropy (NaN for an empty loader).
    """

    labels: np.ndarray
    probs: np.ndarray
    loss: float
    num_examples: int


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be available or it fails."""
    wanted = (name or "auto").strip().lower()
    if wanted == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(wanted)
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"train.device={name!r} is not a device name; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use auto or cpu")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"train.device={name!r} but only {count} CUDA device(s) exist")
    if device.type == "mps" and not _mps_available():
        raise ValueError(f"train.device={name!r} but MPS is not available; use auto or cpu")
    return device


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats on the same hardware."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def class_weights(class_counts: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights ``n / (C * n_c)``, mean 1 over the present classes.

    A class absent from the site gets weight 1: no local example carries it, so the value only
    matters for numerical hygiene.
    """
    counts = [int(c) for c in class_counts]
    if len(counts) != num_classes:
        raise ValueError(
            f"class_counts has {len(counts)} entries but the task has {num_classes} classes"
        )
    if any(c < 0 for c in counts):
        raise ValueError(f"class_counts must be non-negative, got {counts}")
    present = [c for c in counts if c > 0]
    total = sum(present)
    if not present:
        return torch.ones(num_classes)
    weights = [total / (len(present) * c) if c > 0 else 1.0 for c in counts]
    return torch.tensor(weights, dtype=torch.float32)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and kernels only, none on norm scales and biases.

    Decaying a BatchNorm/GroupNorm scale or a bias towards 0 fights the normalisation rather
    than regularising capacity; the usual practice (and timm's) exempts every 1-d parameter.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizer:
    """The configured optimizer; its state is carried between rounds by the caller."""
    groups = parameter_groups(model, cfg.weight_decay)
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"train.optimizer={cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def restore_optimizer_state(optimizer: Optimizer, state: dict | None) -> bool:
    """Load moments kept from the previous round; hyperparameters stay the current config's.

    Returns False (and leaves the fresh optimizer) when the saved state does not fit, e.g.
    after the architecture or the optimizer changed: a node must never fail a round over it.
    """
    if not state:
        return False
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError):
        return False
    for group, settings in zip(optimizer.param_groups, current, strict=True):
        group.update(settings)
    return True


def lr_factor(
    name: str, step: int, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.3
) -> float:
    """Multiplier of ``train.lr`` at global ``step`` (0-based) of a run of ``total_steps``.

    Linear warm-up over ``warmup_steps``, then ``none`` (constant), ``cosine`` (to
    :data:`COSINE_FLOOR` at the last step), ``step`` (x0.1 at 50 % and again at 75 %) or
    ``wsd`` (warm-up, stable, decay: constant, then a cosine to :data:`COSINE_FLOOR` over the
    last ``decay_fraction`` of the run's steps). Why ``wsd``: a run that leaves the loss
    plateau late still trains at the full rate, where a cosine has already halved it.
    """
    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"train.scheduler={name!r} is not one of {', '.join(SCHEDULERS)}")
    if key == "wsd" and not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"train.decay_fraction must be in (0, 1], got {decay_fraction}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)  # the run's last step reaches progress 1
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if key == "wsd":
        start = 1.0 - decay_fraction
        if progress <= start:
            return 1.0
        progress = (progress - start) / decay_fraction
        key = "cosine"
    if key == "cosine":
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))
    if key == "step":
        return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0
    return 1.0


def build_scheduler(
    optimizer: Optimizer,
    name: str,
    total_steps: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.3,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """:func:`lr_factor` as a torch scheduler over ``total_steps`` (None for a constant rate)."""
    if name.lower() == "none" and warmup_steps <= 0:
        lr_factor(name, 0, total_steps)  # validates the name
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(name, step, total_steps, warmup_steps, decay_fraction)
    )


def planned_steps(loader: DataLoader, cfg: TrainConfig) -> int:
    """Optimizer steps one round takes: ``train.local_steps`` when set, else
    ``local_epochs`` passes over the loader; capped by ``train.max_steps``."""
    if cfg.local_steps is not None:
        total = int(cfg.local_steps)
    else:
        try:
            per_epoch = len(loader)
        except TypeError:
            per_epoch = 0
        total = per_epoch * max(1, cfg.local_epochs)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if total else cfg.max_steps
    return max(0, total)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return int(round(max(0.0, cfg.warmup_fraction) * total_steps))


def _loss_fn(
    cfg: TrainConfig,
    num_classes: int,
    class_counts: Sequence[int] | None,
    device: torch.device,
    private: bool = False,
) -> nn.Module:
    mode = cfg.class_weighting.lower()
    if mode not in CLASS_WEIGHTINGS:
        raise ValueError(
            f"train.class_weighting={cfg.class_weighting!r} is not one of "
            f"{', '.join(CLASS_WEIGHTINGS)}"
        )
    if mode != "loss" or private:
        # Under DP-SGD the loss must not depend on the site's private class counts (weights
        # computed from them are a release outside the accountant): plain cross-entropy.
        return nn.CrossEntropyLoss()
    if class_counts is None:
        raise ValueError(
            "train.class_weighting='loss' needs the site's class counts: pass class_counts "
            "(e.g. SiteLoaders.counts) to fit(), or set train.class_weighting=none"
        )
    weights = class_weights(class_counts, num_classes).to(device)
    return nn.CrossEntropyLoss(weight=weights)


class _Proximal:
    """FedProx term ``mu/2 * ||w - w_global||^2`` applied as its gradient ``mu * (w - w_global)``.

    Adding the gradient directly is exact and avoids building an autograd graph over every
    parameter each step, which is what keeps a FedProx round as fast as a FedAvg one.
    """

    def __init__(self, model: nn.Module, global_arrays: dict[str, np.ndarray], mu: float):
        self.mu = mu
        self.params: list[torch.Tensor] = []
        self.anchors: list[torch.Tensor] = []
        for name, param in model.named_parameters():
            if not param.requires_grad or name not in global_arrays:
                continue
            anchor = torch.as_tensor(np.asarray(global_arrays[name]))
            if tuple(anchor.shape) != tuple(param.shape):
                raise ValueError(
                    f"global_arrays[{name!r}] has shape {tuple(anchor.shape)} but the model's "
                    f"parameter has {tuple(param.shape)}"
                )
            self.params.append(param)
            self.anchors.append(anchor.to(device=param.device, dtype=param.dtype))

    def add_to_grads(self) -> None:
        pairs = [
            (p, a) for p, a in zip(self.params, self.anchors, strict=True) if p.grad is not None
        ]
        if not pairs:
            return
        params, anchors = zip(*pairs, strict=True)
        grads = [p.grad for p in params]
        diffs = torch._foreach_sub([p.detach() for p in params], list(anchors))
        torch._foreach_add_(grads, diffs, alpha=self.mu)


def _batches(loader: DataLoader, cfg: TrainConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``local_epochs`` passes, or with ``local_steps`` as many passes as the steps need (each
    pass reshuffles), so a small site and a large one take the same number of steps."""
    if cfg.local_steps is None:
        for _ in range(max(1, cfg.local_epochs)):
            yield from loader
        return
    remaining = int(cfg.local_steps)
    while remaining > 0:
        produced = 0
        for batch in loader:
            yield batch
            produced += 1
            remaining -= 1
            if remaining == 0:
                return
        if produced == 0:
            return


def _progress(iterable: Iterator, total: int, enabled: bool) -> Iterator:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total or None, desc="train", unit="step", leave=False))


def fit(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    num_classes: int,
    *,
    global_arrays: dict[str, np.ndarray] | None = None,
    privacy: PrivacyHook | None = None,
    class_counts: Sequence[int] | None = None,
    schedule: RunSchedule | None = None,
    optimizer_state: dict | None = None,
) -> FitResult:
    """Train ``model`` in place for one local round and return aggregate statistics.

    ``global_arrays`` (the weights the server sent) anchor the FedProx term when
    ``cfg.proximal_mu > 0``; without them the term is off. ``class_counts`` (per class, index =
    label) are required when ``cfg.class_weighting == "loss"``. ``privacy`` wraps model,
    optimizer and loader for DP-SGD (see :class:`PrivacyHook`). ``schedule`` places this round
    in the run's learning-rate schedule (None: the schedule spans this call alone).
    ``optimizer_state`` is a previous round's :attr:`FitResult.optimizer_state` to continue
    from. The model is moved to the device of ``cfg.device`` and left there.
    The round trains on ``fedmsk.threads.training_threads(cfg.num_threads)`` threads (``auto``:
    the node's own limit); the previous setting is restored afterwards.
    """
    device = resolve_device(cfg.device)
    criterion = _loss_fn(cfg, num_classes, class_counts, device, private=privacy is not None)
    if privacy is not None and not privacy.can_train():
        return FitResult(0, math.nan, 0, 0.0, 0.0, float(privacy.after_fit(0)))

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(training_threads(cfg.num_threads))
    try:
        precision = training_precision(model, cfg, device, private=privacy is not None)
        model.to(device)
        if precision.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        proximal = None
        if cfg.proximal_mu > 0 and global_arrays is not None:
            proximal = _Proximal(model, global_arrays, cfg.proximal_mu)
        optimizer = build_optimizer(model, cfg)
        restore_optimizer_state(optimizer, optimizer_state)
        if schedule is None:
            schedule = RunSchedule(0, planned_steps(loader, cfg))
        set_augment_progress(loader.dataset, schedule.start_step / max(1, schedule.total_steps))
        loop = _Loop(criterion, cfg, device, precision, proximal, schedule)
        if privacy is None:
            result = loop.run(model, loader, optimizer)
        else:
            train_model, private_optimizer, train_loader = privacy.attach(model, optimizer, loader)
            try:
                result = loop.run(train_model, train_loader, private_optimizer)
            finally:
                # Runs on failure too: steps already taken have spent budget and must be counted.
                result_epsilon = float(privacy.after_fit(loop.steps))
            result.epsilon = result_epsilon
        # The plain optimizer holds the moments (Opacus' DPOptimizer steps it underneath).
        result.optimizer_state = optimizer.state_dict()
        return result
    finally:
        torch.set_num_threads(previous_threads)


def training_precision(
    model: nn.Module, cfg: TrainConfig, device: torch.device, private: bool = False
) -> Precision:
    """``train.precision`` / ``train.channels_last`` resolved for this model on this device."""
    from fedmsk.privacy.compat import model_name

    return resolve_precision(cfg.precision, cfg.channels_last, device, model_name(model), private)


class _Loop:
    """The hot loop. No ``.item()`` per step: the loss sum stays on the device until the end."""

    def __init__(
        self,
        criterion: nn.Module,
        cfg: TrainConfig,
        device: torch.device,
        precision: Precision,
        proximal: _Proximal | None,
        schedule: RunSchedule,
    ) -> None:
        self.criterion = criterion
        self.cfg = cfg
        self.device = device
        self.precision = precision
        self.proximal = proximal
        self.schedule = schedule
        self.steps = 0  # readable by fit() even when the loop raised

    def _set_lr(self, optimizer: Optimizer, global_step: int, warmup: int) -> None:
        factor = lr_factor(
            self.cfg.scheduler,
            global_step,
            self.schedule.total_steps,
            warmup,
            self.cfg.decay_fraction,
        )
        for group in optimizer.param_groups:
            group["lr"] = self.cfg.lr * factor

    def run(self, model: nn.Module, loader: DataLoader, optimizer: Optimizer) -> FitResult:
        cfg, device, precision = self.cfg, self.device, self.precision
        scaler = torch.amp.GradScaler("cuda") if precision.needs_grad_scaler else None
        planned = planned_steps(loader, cfg)
        warmup = warmup_steps(cfg, self.schedule.total_steps)
        max_steps = cfg.max_steps if cfg.max_steps is not None else -1
        non_blocking = device.type == "cuda"
        memory_format = torch.channels_last if precision.channels_last else None
        constant_lr = cfg.scheduler.lower() == "none" and warmup == 0
        # An unknown schedule name or a bad decay share fails before any step.
        lr_factor(cfg.scheduler, 0, 1, 0, cfg.decay_fraction)
        if constant_lr:
            self._set_lr(optimizer, 0, 0)

        loss_sum = torch.zeros((), device=device)
        images = 0
        start = time.perf_counter()
        batches = _progress(_batches(loader, cfg), planned, cfg.progress)
        for inputs, targets in batches if max_steps != 0 else ():
            if not constant_lr:
                self._set_lr(optimizer, self.schedule.start_step + self.steps, warmup)
            inputs = inputs.to(device, non_blocking=non_blocking)
            if memory_format is not None:
                inputs = inputs.contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=non_blocking)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast(device):
                logits = model(inputs)
            loss = self.criterion(logits.float(), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                if self.proximal is not None:
                    self.proximal.add_to_grads()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if self.proximal is None:
                    optimizer.step()
                else:
                    _proximal_step(optimizer, self.proximal)
            batch = inputs.shape[0]
            if batch:
                loss_sum += loss.detach().float() * batch
                images += batch
            self.steps += 1
            if self.steps == max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        mean_loss = float(loss_sum.item()) / images if images else math.nan
        if images and not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"training diverged: the round's mean loss is {mean_loss} "
                f"(lower train.lr={cfg.lr} or use a larger data.image_size)"
            )
        return FitResult(
            num_examples=_dataset_size(loader),
            mean_loss=mean_loss,
            steps=self.steps,
            seconds=seconds,
            images_per_second=images / seconds if seconds > 0 else 0.0,
            precision=precision.name,
        )


def _proximal_step(optimizer: Optimizer, proximal: _Proximal) -> None:
    """Optimizer step with the FedProx gradient added where it survives.

    An Opacus ``DPOptimizer`` rebuilds ``p.grad`` from clipped per-sample gradients plus noise
    in ``pre_step()``, which would erase a proximal gradient added before ``step()``. The
    proximal gradient depends on no example, so adding it after privatisation costs no privacy:
    for an optimizer with ``pre_step``/``original_optimizer`` (Opacus' protocol) it is added
    between the two.
    """
    pre_step = getattr(optimizer, "pre_step", None)
    inner = getattr(optimizer, "original_optimizer", None)
    if callable(pre_step) and isinstance(inner, Optimizer):
        if pre_step():
            proximal.add_to_grads()
            inner.step()
        return
    proximal.add_to_grads()
    optimizer.step()


def _dataset_size(loader: DataLoader) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str | None = None,
    precision: Precision | None = None,
) -> EvalResult:
    """Softmax scores for every image of ``loader``, in loader order, plus the mean loss.

    ``device``: where to run (a name such as ``"auto"`` is resolved); None keeps the model
    where it is. ``precision``: autocast and layout (see :func:`training_precision`); None is
    fp32. Scores and loss are computed in fp32 from the logits. The model is left in eval mode.
    """
    if device is None:
        target = _model_device(model)
    elif isinstance(device, str):
        target = resolve_device(device)
    else:
        target = device
    model.to(target)
    model.eval()
    non_blocking = target.type == "cuda"
    memory_format = torch.channels_last if precision and precision.channels_last else None
    if memory_format is not None:
        model.to(memory_format=memory_format)
    autocast = precision.autocast(target) if precision else nullcontext()
    all_labels: list[torch.Tensor] = []
    all_probs: list[torch.Tensor] = []
    loss_sum = torch.zeros((), device=target, dtype=torch.float64)
    for inputs, targets in loader:
        if inputs.shape[0] == 0:
            continue
        inputs = inputs.to(target, non_blocking=non_blocking)
        if memory_format is not None:
            inputs = inputs.contiguous(memory_format=memory_format)
        targets = targets.to(target, non_blocking=non_blocking)
        with autocast:
            logits = model(inputs)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        all_probs.append(torch.softmax(logits, dim=1).cpu())
        all_labels.append(targets.cpu())
    if not all_labels:
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        return EvalResult(
            labels=np.zeros(0, dtype=np.int64),
            probs=np.zeros((0, num_classes), dtype=np.float32),
            loss=math.nan,
            num_examples=0,
        )
    labels = torch.cat(all_labels).numpy().astype(np.int64)
    probs = torch.cat(all_probs).numpy().astype(np.float32)
    return EvalResult(
        labels=labels,
        probs=probs,
        loss=float(loss_sum.item()) / len(labels),
        num_examples=len(labels),
    )
