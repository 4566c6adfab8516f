"""Which number format and memory layout a node trains in, decided from its hardware.

bf16 autocast with channels-last tensors trains ResNet-18 at 128 px about twice as fast as fp32
on CPUs with native bf16 (AVX512-BF16 or AMX), and is emulated, hence slower, on CPUs without
it (AVX2-only EPYC machines of the same kind). So ``train.precision=auto`` looks at the device
it runs on, never at a list of machine names, and chooses bf16 only where the hardware computes
it natively *and* the architecture is in :data:`BF16_VALIDATED` (measured to reach the same
held-out AUC as fp32; docs/benchmarks.md). DP-SGD keeps fp32: Opacus' per-sample gradients were
not measured in bf16.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CHANNELS_LAST_CHOICES = ("auto", "on", "off")

BF16_VALIDATED = frozenset({"resnet18", "resnet34", "resnet50"})
"""Architectures whose bf16 training matched fp32 held-out AUC on the synthetic federation."""


@dataclass(frozen=True)
class Precision:
    """The resolved choice for one device: autocast dtype (None = fp32) and memory layout."""

    dtype: torch.dtype | None
    channels_last: bool
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self, device: torch.device) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX tiles: bf16 matrix products in hardware, not emulated."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def device_has_native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_precision(
    requested: str,
    channels_last: str,
    device: torch.device,
    model_name: str,
    private: bool = False,
) -> Precision:
    """Turn ``train.precision`` / ``train.channels_last`` into what a device will really do.

    Explicit ``bf16``/``fp16`` are honoured where the device can run them (fp16 only on CUDA);
    ``auto`` is fp32 unless the device has native bf16 and the model is validated for it (on
    CUDA without bf16, fp16 with a gradient scaler). Under DP-SGD everything is fp32.
    """
    wanted = (requested or "auto").lower()
    if wanted not in PRECISIONS:
        raise ValueError(f"train.precision={requested!r} is not one of {', '.join(PRECISIONS)}")
    layout = (channels_last or "auto").lower()
    if layout not in CHANNELS_LAST_CHOICES:
        choices = ", ".join(CHANNELS_LAST_CHOICES)
        raise ValueError(f"train.channels_last={channels_last!r} is not one of {choices}")
    dtype, reason = _choose_dtype(wanted, device, model_name, private)
    if layout == "auto":
        # Measured: channels-last speeds bf16 convolutions (oneDNN/AMX, cuDNN) and slows fp32
        # ones on CPU slightly; on CUDA it helps both.
        use_cl = device.type == "cuda" or (device.type == "cpu" and dtype is torch.bfloat16)
    else:
        use_cl = layout == "on"
    return Precision(dtype, use_cl, reason)


def _choose_dtype(
    wanted: str, device: torch.device, model_name: str, private: bool
) -> tuple[torch.dtype | None, str]:
    if private:
        return None, "fp32: DP-SGD computes per-sample gradients in fp32"
    if wanted == "fp32":
        return None, "fp32: train.precision=fp32"
    native = device_has_native_bf16(device)
    if wanted == "bf16":
        if device.type not in ("cpu", "cuda"):
            return None, f"fp32: bf16 autocast is not offered on {device.type}"
        note = "" if native else " (emulated on this device: expect it slower than fp32)"
        return torch.bfloat16, "bf16: train.precision=bf16" + note
    if wanted == "fp16":
        if device.type != "cuda":
            raise ValueError("train.precision=fp16 needs a CUDA device; use auto, bf16 or fp32")
        return torch.float16, "fp16: train.precision=fp16"
    if device.type == "cuda":
        if native:
            return torch.bfloat16, "bf16: auto, GPU with native bf16"
        return torch.float16, "fp16: auto, GPU without bf16"
    if not native:
        return None, f"fp32: auto, {device.type} has no native bf16"
    if model_name not in BF16_VALIDATED:
        return None, f"fp32: auto, {model_name} is not validated for bf16"
    return torch.bfloat16, "bf16: auto, CPU with native bf16 (AVX512-BF16/AMX)"


PRECISION_NAMES = ("fp32", "bf16", "fp16")
"""What a node may report it trained in; anything else is dropped by the coordinator."""


def describe_precisions(trained_in: dict[str, str | None]) -> str | None:
    """One line for a run's record: "bf16" when every training site agrees, else the counts
    ("fp32 at 5 centers, bf16 at 7 centers"), since runs trained in different precisions take
    different paths (docs/benchmarks.md, "bf16 on a CPU that has it")."""
    known = [name for name in trained_in.values() if name in PRECISION_NAMES]
    if not known:
        return None
    counts = {name: known.count(name) for name in PRECISION_NAMES if name in known}
    if len(counts) == 1 and len(known) == len(trained_in):
        return known[0]
    parts = [
        f"{name} at {count} center{'s' if count > 1 else ''}" for name, count in counts.items()
    ]
    unknown = len(trained_in) - len(known)
    if unknown:
        parts.append(f"not reported by {unknown}")
    return ", ".join(parts)
