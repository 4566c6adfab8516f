"""One local round of training, and evaluation that returns per-image scores.

Both functions are plain PyTorch over any ``nn.Module`` and ``DataLoader`` yielding
``(images, labels)``; they know nothing of Flower, of sites or of files, so the same code runs a
pooled baseline, a single site, or a federated client. Per-image outputs of :func:`evaluate` stay
in the process that owns the images: only aggregates computed from them may leave a node.

The hot loop of :func:`fit` is kept as close to a bare PyTorch loop as possible (no per-step host
synchronisation, the proximal term applied to gradients instead of through autograd), because
``simulations/bench_fit.py`` holds it to >= 0.95 of a bare loop's throughput.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedmsk.config import TrainConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "cosine", "step")
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

    fit turns AMP off whenever a hook is given: per-sample gradients are computed in fp32.
    """

    def attach(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, Optimizer, DataLoader]: ...

    def can_train(self) -> bool: ...

    def after_fit(self, steps: int) -> float: ...


@dataclass
class FitResult:
    """Summary of one local round; all fields are aggregates that may leave a node.

    ``num_examples`` is the size of the training set (``len(loader.dataset)``), the weight a
    FedAvg-style strategy gives this site; 0 when no training happened (privacy budget spent).
    ``mean_loss`` is the example-weighted mean of the optimised (possibly class-weighted) loss,
    without the proximal term; NaN when no step ran. ``images_per_second`` counts the images
    actually processed (which ``max_steps`` may make fewer than an epoch).
    """

    num_examples: int
    mean_loss: float
    steps: int
    seconds: float
    images_per_second: float
    epsilon: float | None = None


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizer:
    """A fresh optimizer per round: local optimizer state is not carried between rounds."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = cfg.optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optimizer={cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def build_scheduler(
    optimizer: Optimizer, name: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step schedule over one local round: cosine to 0, or x0.1 at 50 % and 75 % (step)."""
    key = name.lower()
    if key == "none":
        return None
    steps = max(1, total_steps)
    if key == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    if key == "step":
        milestones = sorted({max(1, steps // 2), max(1, (3 * steps) // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    raise ValueError(f"train.scheduler={name!r} is not one of {', '.join(SCHEDULERS)}")


def _planned_steps(loader: DataLoader, cfg: TrainConfig) -> int:
    try:
        per_epoch = len(loader)
    except TypeError:
        per_epoch = 0
    total = per_epoch * max(1, cfg.local_epochs)
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps) if total else cfg.max_steps
    return total


class _PerSampleWeightedLoss(nn.Module):
    """Class-weighted cross-entropy averaged over the batch size, not the batch's weights.

    PyTorch's weighted mean divides by the sum of the batch's weights, which couples every
    image's gradient to the other images in the batch: under DP-SGD one image's influence
    would then not be bounded by the clipping norm alone. Dividing by the batch size keeps
    the loss a plain sum of per-image terms.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.criterion = nn.CrossEntropyLoss(weight=weight, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits, target).sum() / max(1, target.shape[0])


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
    if mode != "loss":
        return nn.CrossEntropyLoss()
    if class_counts is None:
        raise ValueError(
            "train.class_weighting='loss' needs the site's class counts: pass class_counts "
            "(e.g. SiteLoaders.counts) to fit(), or set train.class_weighting=none"
        )
    weights = class_weights(class_counts, num_classes).to(device)
    return _PerSampleWeightedLoss(weights) if private else nn.CrossEntropyLoss(weight=weights)


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


def _autocast(device: torch.device, enabled: bool) -> tuple[AbstractContextManager, bool]:
    """bf16 autocast where the GPU supports it (no scaler needed), else fp16 with a scaler."""
    if not enabled:
        return nullcontext(), False
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), False
    return torch.autocast("cuda", dtype=torch.float16), True


def _batches(loader: DataLoader, epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(max(1, epochs)):
        yield from loader


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
) -> FitResult:
    """Train ``model`` in place for one local round and return aggregate statistics.

    ``global_arrays`` (the weights the server sent) anchor the FedProx term when
    ``cfg.proximal_mu > 0``; without them the term is off. ``class_counts`` (per class, index =
    label) are required when ``cfg.class_weighting == "loss"``. ``privacy`` wraps model,
    optimizer and loader for DP-SGD (see :class:`PrivacyHook`). The model is moved to the device
    of ``cfg.device`` and left there. ``torch.set_num_threads(cfg.num_threads)`` holds for the
    round and the previous setting is restored afterwards.
    """
    device = resolve_device(cfg.device)
    criterion = _loss_fn(cfg, num_classes, class_counts, device, private=privacy is not None)
    if privacy is not None and not privacy.can_train():
        return FitResult(0, math.nan, 0, 0.0, 0.0, float(privacy.after_fit(0)))

    previous_threads = torch.get_num_threads()
    if cfg.num_threads and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    try:
        model.to(device)
        model.train()
        proximal = None
        if cfg.proximal_mu > 0 and global_arrays is not None:
            proximal = _Proximal(model, global_arrays, cfg.proximal_mu)
        optimizer = build_optimizer(model, cfg)
        counter = _StepCounter()
        if privacy is None:
            return _train(model, loader, optimizer, criterion, cfg, device, proximal, counter)
        train_model, optimizer, train_loader = privacy.attach(model, optimizer, loader)
        try:
            result = _train(
                train_model, train_loader, optimizer, criterion, cfg, device, proximal, counter
            )
        finally:
            # Runs on failure too: steps already taken have spent budget and must be accounted.
            epsilon = float(privacy.after_fit(counter.steps))
        result.epsilon = epsilon
        return result
    finally:
        torch.set_num_threads(previous_threads)


@dataclass
class _StepCounter:
    """Optimizer steps taken so far, readable by fit() even when the loop raised."""

    steps: int = 0


def _train(
    model: nn.Module,
    loader: DataLoader,
    optimizer: Optimizer,
    criterion: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    proximal: _Proximal | None,
    counter: _StepCounter,
) -> FitResult:
    """The hot loop. No ``.item()`` per step: the loss sum stays on the device until the end."""
    use_amp = bool(cfg.amp) and device.type == "cuda" and not _is_private(optimizer)
    autocast, needs_scaler = _autocast(device, use_amp)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    planned = _planned_steps(loader, cfg)
    scheduler = build_scheduler(optimizer, cfg.scheduler, planned)
    max_steps = cfg.max_steps if cfg.max_steps is not None else -1
    non_blocking = device.type == "cuda"

    loss_sum = torch.zeros((), device=device)
    images = 0
    steps = 0
    start = time.perf_counter()
    if max_steps != 0:
        for inputs, targets in _progress(_batches(loader, cfg.local_epochs), planned, cfg.progress):
            inputs = inputs.to(device, non_blocking=non_blocking)
            targets = targets.to(device, non_blocking=non_blocking)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = criterion(model(inputs), targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if scaler is not None:
                if proximal is not None:
                    proximal.add_to_grads()
                scaler.step(optimizer)
                scaler.update()
            elif proximal is None:
                optimizer.step()
            else:
                _proximal_step(optimizer, proximal)
            if scheduler is not None:
                scheduler.step()
            batch = inputs.shape[0]
            if batch:
                loss_sum += loss.detach().float() * batch
                images += batch
            steps += 1
            counter.steps = steps
            if steps == max_steps:
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
        steps=steps,
        seconds=seconds,
        images_per_second=images / seconds if seconds > 0 else 0.0,
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


def _is_private(optimizer: Optimizer) -> bool:
    return hasattr(optimizer, "noise_multiplier")


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
    model: nn.Module, loader: DataLoader, device: torch.device | str | None = None
) -> EvalResult:
    """Softmax scores for every image of ``loader``, in loader order, plus the mean loss.

    ``device``: where to run (a name such as ``"auto"`` is resolved); None keeps the model
    where it is. The model is left in eval mode.
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
    all_labels: list[torch.Tensor] = []
    all_probs: list[torch.Tensor] = []
    loss_sum = torch.zeros((), device=target, dtype=torch.float64)
    for inputs, targets in loader:
        if inputs.shape[0] == 0:
            continue
        inputs = inputs.to(target, non_blocking=non_blocking)
        targets = targets.to(target, non_blocking=non_blocking)
        logits = model(inputs).float()
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
