"""BatchNorm statistics measured at the global weights, combined across sites.

Averaging the sites' running statistics gives the global model statistics that no site measured
at the global weights: each site's were accumulated (momentum 0.1) along its own local
trajectory, a server optimiser moves the weights past the clients' average while the statistics
stay behind, and a plain average of variances drops the variance between sites. Instead, each
training site runs the *global* model forward over (part of) its training images, unaugmented,
and returns per-channel mean, variance and count for every BatchNorm layer; the coordinator
combines them exactly as one pooled data set would give:

    mean = sum_k w_k mean_k,   var = sum_k w_k (var_k + mean_k^2) - mean^2,   w_k = n_k / n.

Only these per-channel aggregates leave a node. Layers are run in training mode (normalised by
batch statistics, as during training) while the statistics of their inputs are accumulated over
all images, so each layer's statistics describe the activations it will see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

MEAN_SUFFIX = ".running_mean"
VAR_SUFFIX = ".running_var"


@dataclass
class ChannelMoments:
    """Per-channel count, mean and (population) variance of one layer's input."""

    count: int
    mean: np.ndarray
    var: np.ndarray


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that track running statistics, by state-dict prefix."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.running_mean is not None
    }


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


class _Accumulator:
    def __init__(self) -> None:
        self.count = 0
        self.total: torch.Tensor | None = None
        self.squares: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.ndim) if d != 1]
        count = x.numel() // x.shape[1]
        total = x.sum(dim=dims)
        squares = (x * x).sum(dim=dims)
        if self.total is None:
            self.total, self.squares = total, squares
        else:
            self.total += total
            self.squares += squares
        self.count += count

    def moments(self) -> ChannelMoments:
        assert self.total is not None and self.squares is not None
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp_min(0.0)
        return ChannelMoments(self.count, mean.cpu().numpy(), var.cpu().numpy())


@torch.no_grad()
def measure_moments(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | None = None
) -> dict[str, ChannelMoments]:
    """Moments of every BatchNorm layer's input over ``batches`` (image tensors), at the
    model's current weights. The model's parameters and running statistics are unchanged."""
    layers = batchnorm_layers(model)
    if not layers:
        return {}
    saved = {
        name: [b.detach().clone() for b in m.buffers(recurse=False)] for name, m in layers.items()
    }
    accumulators = {name: _Accumulator() for name in layers}
    handles = [m.register_forward_pre_hook(accumulators[n]) for n, m in layers.items()]
    was_training = model.training
    target = device or next(model.parameters()).device
    try:
        model.train()
        for images in batches:
            if images.shape[0] < 2:  # a lone image has no batch statistics in training mode
                continue
            model(images.to(target))
    finally:
        for handle in handles:
            handle.remove()
        for name, module in layers.items():
            for buffer, kept in zip(module.buffers(recurse=False), saved[name], strict=True):
                buffer.copy_(kept)
        model.train(was_training)
    return {name: acc.moments() for name, acc in accumulators.items() if acc.count}


def image_batches(loader: DataLoader, max_images: int | None) -> Iterable[torch.Tensor]:
    """The images of ``loader`` (labels dropped), stopping after ``max_images``."""
    seen = 0
    for images, _ in loader:
        if max_images is not None and seen >= max_images:
            return
        if max_images is not None:
            images = images[: max_images - seen]
        seen += images.shape[0]
        yield images


def to_arrays(moments: Mapping[str, ChannelMoments]) -> dict[str, np.ndarray]:
    """Flat arrays for a message: ``LAYER.count``, ``LAYER.mean``, ``LAYER.var``."""
    out: dict[str, np.ndarray] = {}
    for name, m in moments.items():
        out[f"{name}.count"] = np.asarray([m.count], dtype=np.float64)
        out[f"{name}.mean"] = np.asarray(m.mean, dtype=np.float64)
        out[f"{name}.var"] = np.asarray(m.var, dtype=np.float64)
    return out


def from_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, ChannelMoments]:
    layers = {key.rsplit(".", 1)[0] for key in arrays if key.endswith(".count")}
    return {
        name: ChannelMoments(
            int(np.asarray(arrays[f"{name}.count"]).reshape(-1)[0]),
            np.asarray(arrays[f"{name}.mean"], dtype=np.float64),
            np.asarray(arrays[f"{name}.var"], dtype=np.float64),
        )
        for name in sorted(layers)
    }


def combine(per_site: list[Mapping[str, ChannelMoments]]) -> dict[str, ChannelMoments]:
    """The moments of the union of the sites' images (layers every site reported)."""
    sites = [s for s in per_site if s]
    if not sites:
        return {}
    names = set(sites[0])
    for site in sites[1:]:
        names &= set(site)
    combined = {}
    for name in sorted(names):
        parts = [site[name] for site in sites]
        total = sum(p.count for p in parts)
        weights = [p.count / total for p in parts]
        mean = sum(w * p.mean for w, p in zip(weights, parts, strict=True))
        second = sum(w * (p.var + p.mean * p.mean) for w, p in zip(weights, parts, strict=True))
        combined[name] = ChannelMoments(total, mean, np.clip(second - mean * mean, 0.0, None))
    return combined


def apply_to_arrays(
    arrays: dict[str, np.ndarray], moments: Mapping[str, ChannelMoments]
) -> list[str]:
    """Write ``moments`` into the running statistics of a model's arrays (in place).

    The running variance is stored unbiased, as BatchNorm itself keeps it. Returns the layers
    written; layers absent from ``arrays`` are skipped.
    """
    written = []
    for name, m in moments.items():
        mean_key, var_key = name + MEAN_SUFFIX, name + VAR_SUFFIX
        if mean_key not in arrays or var_key not in arrays:
            continue
        unbiased = m.var * (m.count / max(1, m.count - 1))
        arrays[mean_key] = m.mean.astype(arrays[mean_key].dtype).reshape(arrays[mean_key].shape)
        arrays[var_key] = unbiased.astype(arrays[var_key].dtype).reshape(arrays[var_key].shape)
        written.append(name)
    return written


def refresh_statistics(
    model: nn.Module, loaders: Iterable[DataLoader], max_images_per_loader: int | None
) -> list[str]:
    """Give ``model`` BatchNorm statistics measured at its weights over several data sets
    (one loader per site), combined as the federation combines them. Pooled and local-only
    baselines use it so that they are scored exactly as a federated model is."""
    per_site = [
        measure_moments(model, image_batches(loader, max_images_per_loader)) for loader in loaders
    ]
    moments = combine(per_site)
    if not moments:
        return []
    from fedmsk.models import get_arrays, set_arrays

    arrays = get_arrays(model)
    written = apply_to_arrays(arrays, moments)
    set_arrays(model, arrays)
    return written
