"""Model surgery that lets Opacus compute per-sample gradients of timm models.

DP-SGD needs each image's own gradient. Three things in timm models stop Opacus from getting it:

* BatchNorm mixes the images of a batch, so a per-sample gradient does not exist. Opacus'
  ``ModuleValidator`` checks types exactly and so misses timm's ``BatchNormAct2d`` (a BatchNorm2d
  subclass used by EfficientNet, MobileNetV3, MnasNet): validation passes and ``make_private``
  fails later. Every BatchNorm, subclasses included, becomes a GroupNorm here.
* In-place activations overwrite a hooked layer's output, which Opacus' backward hooks need.
* timm's ResNet blocks add the shortcut in place (``x += shortcut``) onto the output of their last
  norm layer; under Opacus' hooks that output is a view and the in-place add fails. A
  parameter-free ``CloneOutput`` is placed in the block's ``drop_path`` slot (applied right before
  the add) so that the add works on a fresh tensor.

The changed model is a different architecture: BatchNormAct2d layers become :class:`GroupNormAct`
containers, so their parameters are named ``<name>.norm.weight`` instead of ``<name>.weight``.
Every site builds the same variant, so arrays exchanged in a federation still match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

MAX_GROUPS = 32


class DPCompatibilityError(ValueError):
    """A model that cannot be made compatible with Opacus' per-sample gradients."""


class CloneOutput(nn.Module):
    """Identity that returns a copy, so an in-place op after it never edits a hooked output."""

    def forward(self, x: Tensor) -> Tensor:
        return x.clone()


class GroupNormAct(nn.Module):
    """GroupNorm followed by timm's dropout and activation: the DP stand-in for BatchNormAct2d.

    The norm is a plain ``nn.GroupNorm`` (exact type) so Opacus uses its fast GroupNorm
    per-sample gradient instead of the generic functorch fallback.
    """

    def __init__(self, norm: nn.GroupNorm, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))


@dataclass
class _Changes:
    batchnorm: dict[str, int] = field(default_factory=dict)
    inplace: int = 0
    residual_clones: int = 0

    def describe(self) -> list[str]:
        lines = [
            f"replaced {count} {kind} with GroupNorm" for kind, count in self.batchnorm.items()
        ]
        if self.inplace:
            lines.append(f"disabled {self.inplace} in-place activations")
        if self.residual_clones:
            lines.append(
                f"cloned the residual branch before the in-place shortcut add in "
                f"{self.residual_clones} ResNet blocks"
            )
        return lines


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """The largest group count <= ``max_groups`` that divides ``channels`` (GroupNorm needs it)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def _group_norm_from(bn: _BatchNorm) -> nn.GroupNorm:
    """A GroupNorm of the same width; BatchNorm's affine weights are kept as a starting point."""
    channels = bn.num_features
    gn = nn.GroupNorm(group_count(channels), channels, eps=bn.eps, affine=bn.affine)
    if bn.affine and bn.weight is not None and bn.bias is not None:
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
    gn.to(device=bn.weight.device if bn.weight is not None else None)
    return gn


def _replacement_for(bn: _BatchNorm) -> nn.Module:
    gn = _group_norm_from(bn)
    act = getattr(bn, "act", None)
    drop = getattr(bn, "drop", None)
    if isinstance(act, nn.Module) or isinstance(drop, nn.Module):
        return GroupNormAct(gn, drop or nn.Identity(), act or nn.Identity())
    return gn


def _replace_batchnorms(module: nn.Module, changes: _Changes) -> None:
    for name, child in module.named_children():
        if isinstance(child, _BatchNorm):
            setattr(module, name, _replacement_for(child))
            kind = type(child).__name__
            changes.batchnorm[kind] = changes.batchnorm.get(kind, 0) + 1
        else:
            _replace_batchnorms(child, changes)


def _disable_inplace(model: nn.Module, changes: _Changes) -> None:
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
            changes.inplace += 1


def _residual_block_types() -> tuple[type, ...]:
    try:
        from timm.models.resnet import BasicBlock, Bottleneck
    except ImportError:  # pragma: no cover - timm is a dependency, but keep surgery usable
        return ()
    return (BasicBlock, Bottleneck)


class _ClonedDropPath(nn.Sequential):
    """An existing drop-path (identity at p=0 or in eval) followed by a clone."""


_HasClone = (CloneOutput, _ClonedDropPath)


def _break_residual_aliasing(model: nn.Module, changes: _Changes) -> None:
    """Insert a clone in the ``drop_path`` slot that timm ResNet blocks apply before ``+=``."""
    block_types = _residual_block_types()
    for module in model.modules():
        if not isinstance(module, block_types) or isinstance(
            getattr(module, "drop_path", None), _HasClone
        ):
            continue
        current = getattr(module, "drop_path", None)
        module.drop_path = (
            CloneOutput() if current is None else _ClonedDropPath(current, CloneOutput())
        )
        changes.residual_clones += 1


def model_name(model: nn.Module) -> str:
    """A readable name for error messages: timm's architecture name, else the class name."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("architecture"):
            return str(cfg["architecture"])
    return type(model).__name__


def validation_errors(model: nn.Module) -> list[str]:
    """Opacus' validator plus the BatchNorm subclasses it misses, as messages."""
    from opacus.validators import ModuleValidator

    errors = [str(err) for err in ModuleValidator.validate(model, strict=False)]
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            errors.append(f"{name}: {type(module).__name__} mixes samples of a batch")
    return errors


def make_dp_compatible(model: nn.Module, *, name: str | None = None) -> tuple[nn.Module, list[str]]:
    """Make ``model`` trainable with Opacus DP-SGD, in place; return it and what was changed.

    Raises :class:`DPCompatibilityError` naming the model when Opacus' validator still finds
    layers it cannot handle (the model must then be changed or another one chosen).
    """
    label = name or model_name(model)
    changes = _Changes()
    _replace_batchnorms(model, changes)
    _disable_inplace(model, changes)
    _break_residual_aliasing(model, changes)
    errors = validation_errors(model)
    if errors:
        shown = "; ".join(errors[:5]) + (f"; ... {len(errors) - 5} more" if len(errors) > 5 else "")
        raise DPCompatibilityError(
            f"model {label!r} cannot be made compatible with DP-SGD (Opacus): {shown}. "
            "Choose another model (e.g. resnet18, efficientnet_b0) or set privacy.enabled=false."
        )
    return model, changes.describe()


def has_depthwise_conv(model: nn.Module) -> bool:
    """Grouped/depthwise convolutions make Opacus' hook modes slow: pick functorch for them."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
