"""Model factory over timm, local pretrained weights, and weights as named NumPy arrays.

Every model comes from timm by name, so adding an architecture is a config change. Nothing is
ever downloaded: ``pretrained=None`` means random initialisation and a path means a local weight
file (hospital nodes have no internet access, and a silent download would make runs differ
between sites).

Weights cross process and network boundaries as ``dict[str, np.ndarray]`` in state-dict order
(:func:`get_arrays` / :func:`set_arrays`), which is what Flower's ``ArrayRecord`` carries. The
``num_batches_tracked`` counters of BatchNorm layers are left out of those dicts on purpose: they
are int64 step counters that timm's BatchNorm (fixed momentum) never reads, and averaging them
across sites is meaningless; keeping every exchanged array floating point keeps aggregation,
secure aggregation and checkpoint arithmetic simple.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

TINY_MODEL_ALIAS = "tiny"
TINY_MODEL = "test_resnet"
"""timm's ~0.37 M-parameter ResNet for tests and demos (``name="tiny"``)."""

SUPPORTED_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "mobilenetv3_small_100",
    "mnasnet_100",
    TINY_MODEL_ALIAS,
)
"""Architectures the project tests; any other timm model name works as well."""

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "arrays", "state_dict_ema")
_SKIPPED_BUFFER_SUFFIX = "num_batches_tracked"


class WeightFileError(ValueError):
    """A local weight file that is missing, unreadable, or does not fit the model."""


def model_arguments(cfg: Any) -> dict[str, Any]:
    """:func:`create_model`'s arguments for an ``ExperimentConfig`` (hashable values only, so
    the dict can key a cache of built models). DP runs get the DP-compatible variant."""
    return {
        "name": cfg.model.name,
        "num_classes": cfg.task.num_classes,
        "in_chans": cfg.data.in_chans,
        "pretrained": cfg.model.pretrained,
        "dp_compatible": cfg.model.dp_compatible or cfg.privacy.enabled,
        "drop_rate": cfg.model.drop_rate,
        "timm_kwargs": tuple(sorted((k, _frozen(v)) for k, v in _timm_kwargs(cfg.model).items())),
        **_stem_strides(cfg.model),
        "head_init_scale": float(cfg.model.head_init_scale),
    }


def _written_for_this_network(model: Any) -> bool:
    written_for = getattr(model, "timm_kwargs_for", None)
    return not written_for or written_for == model.name


def _timm_kwargs(model: Any) -> dict[str, Any]:
    """The model group's timm arguments, unless they were written for another architecture."""
    return dict(model.timm_kwargs) if _written_for_this_network(model) else {}


_STEM_STRIDE_KEYS = ("stem_conv_stride", "stem_pool_stride")


def _stem_strides(model: Any) -> dict[str, int | None]:
    """The group's ``stem_conv_stride`` and ``stem_pool_stride`` (None where unset), under the
    same rule as its timm arguments."""
    written_for_it = _written_for_this_network(model)
    strides: dict[str, int | None] = {}
    for key in _STEM_STRIDE_KEYS:
        stride = getattr(model, key, None)
        strides[key] = int(stride) if stride is not None and written_for_it else None
    return strides


def model_label(model: Any) -> str:
    """The architecture as a reader should see it in the terminal and the report.

    Why: the default model is timm's ``resnet18`` built at half width with a stride-16 last
    stage; the name alone told a user (and a report) it was the standard ResNet-18.
    """
    kwargs = _timm_kwargs(model)
    kwargs.update({k: stride for k, stride in _stem_strides(model).items() if stride is not None})
    if not kwargs:
        return str(model.name)

    def show(value: Any) -> str:
        # Spaces, not dashes: "32-64-128" reads as a date to the report's PHI filter.
        if isinstance(value, list | tuple):
            return " ".join(str(v) for v in value)
        return str(value)

    settings = ", ".join(f"{key}={show(value)}" for key, value in sorted(kwargs.items()))
    return f"{model.name} ({settings})"


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def model_from_config(cfg: Any, initial_weights: bool = True) -> nn.Module:
    """The model an experiment config describes, randomly initialised or from its local file.

    ``initial_weights=False`` skips ``model.pretrained`` for a model whose arrays are about to
    be overwritten (a run's final model), so its report needs no weight file."""
    arguments = model_arguments(cfg)
    if not initial_weights:
        arguments["pretrained"] = None
    return create_model(**arguments)


def create_model(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: str | None = None,
    dp_compatible: bool = False,
    drop_rate: float = 0.0,
    timm_kwargs: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    stem_pool_stride: int | None = None,
    stem_conv_stride: int | None = None,
    head_init_scale: float = 1.0,
) -> nn.Module:
    """Build a timm classifier with ``num_classes`` outputs for ``in_chans``-channel images.

    ``pretrained``: None (random init) or a local ``.pth``/``.pt``/``.safetensors`` file. The
    file's classifier head is dropped when its class count differs, and its first convolution
    adapted when its channel count differs (both logged). ``timm_kwargs`` are passed to
    ``timm.create_model`` (e.g. ``channels``/``output_stride`` of a narrower ResNet).
    ``stem_pool_stride`` replaces a ResNet stem's max pool (see :func:`set_stem_pool_stride`),
    ``stem_conv_stride`` sets the stride of its first convolution (:func:`set_stem_conv_stride`).
    ``head_init_scale`` multiplies the randomly drawn classifier (0: every first logit is 0).
    ``dp_compatible`` applies
    ``fedmsk.privacy.make_dp_compatible`` (BatchNorm to GroupNorm, no in-place ops) after the
    weights are loaded, so ImageNet-style weights still initialise the convolutions.
    """
    timm_name = resolve_model_name(name)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1 (from task.classes), got {num_classes}")
    if int(in_chans) < 1:
        raise ValueError(f"data.in_chans must be >= 1, got {in_chans}")
    model = timm.create_model(
        timm_name,
        pretrained=False,
        num_classes=int(num_classes),
        in_chans=int(in_chans),
        drop_rate=float(drop_rate),
        **dict(timm_kwargs),
    )
    bound_classifier_init(model)
    scale_classifier_init(model, float(head_init_scale))
    if stem_pool_stride is not None:
        set_stem_pool_stride(model, int(stem_pool_stride), timm_name)
    if stem_conv_stride is not None:
        set_stem_conv_stride(model, int(stem_conv_stride), timm_name)
    if pretrained:
        state = read_weight_file(pretrained)
        try:
            load_pretrained(model, state, source=str(pretrained))
        except WeightFileError:
            if not dp_compatible:
                raise
            # The file may come from a DP-compatible model (GroupNorm names): convert first.
            model = _make_dp_compatible(model, timm_name)
            load_pretrained(model, state, source=str(pretrained))
            return model
    if dp_compatible:
        model = _make_dp_compatible(model, timm_name)
    return model


def set_stem_pool_stride(model: nn.Module, stride: int, timm_name: str) -> None:
    """Give a ResNet stem a max pool of ``stride`` (kernel ``stride + 1``, padding ``stride // 2``;
    timm's own is stride 2, kernel 3, padding 1).

    Why: on the synthetic federation at 64 px a quarter of the held-out center's fractures are
    2-5 pixels high and the 64 px recipe misses most of them (docs/benchmarks.md). At 128 px
    with a stride-4 pool the stem's convolution sees every stored pixel and the residual
    stages run at the sizes they have at 64 px; the stem itself runs on a 4x larger map, so a
    training step costs 1.2x the 64 px network's in bf16 and 1.6x in fp32 (not the 4x of a
    128 px network; :func:`set_stem_conv_stride`, the default's way, costs 1.0x). The pool has
    no weights, so a weight file written for the plain network still loads.
    """
    _stem_part(model, "maxpool", nn.MaxPool2d, "stem_pool_stride", stride, timm_name)
    model.maxpool = nn.MaxPool2d(kernel_size=stride + 1, stride=stride, padding=stride // 2)


def set_stem_conv_stride(model: nn.Module, stride: int, timm_name: str) -> None:
    """Give a ResNet's single-convolution stem (7x7, timm's stride 2) the stride ``stride``.

    Why: at stride 4 a 128 px image reaches the stem's max pool and every residual stage at
    the sizes a 64 px image has in the plain network, so the network costs what it costs at
    64 px while its 7x7 kernel still reads every stored pixel (it overlaps at stride 4). The
    stride-4 max pool (:func:`set_stem_pool_stride`) gets there too but runs the stem's
    convolution, BatchNorm and activation on a 4x larger map: 1.6x the fp32 step time of the
    64 px network on these CPUs (docs/benchmarks.md, "Small fractures at 128 px"). Same weights
    as the plain network, so its weight files still load.
    """
    conv = _stem_part(model, "conv1", nn.Conv2d, "stem_conv_stride", stride, timm_name)
    conv.stride = (stride, stride)


def _stem_part(
    model: nn.Module, attribute: str, kind: type[nn.Module], key: str, stride: int, timm_name: str
) -> nn.Module:
    """The ResNet stem module a ``model.<key>`` setting changes; a clear error when the stride
    is not positive or the network has no such module (it is not a ResNet-style stem)."""
    if stride < 1:
        raise ValueError(f"model.{key} must be >= 1, got {stride}")
    part = getattr(model, attribute, None)
    if not isinstance(part, kind):
        raise ValueError(
            f"model.{key}={stride} needs a ResNet-style stem with a {kind.__name__} named "
            f"{attribute}; {timm_name} has none (leave model.{key} unset for this network)"
        )
    return part


def bound_classifier_init(model: nn.Module) -> bool:
    """Re-draw a classifier initialised far wider than PyTorch's ``nn.Linear`` default.

    Why: timm's EfficientNet, MobileNetV3 and MnasNet draw their last layer from
    U(-1/sqrt(num_classes), 1/sqrt(num_classes)), a recipe made for 1,000 classes. With 2 classes
    and 1,280 features that is 25 times PyTorch's bound 1/sqrt(in_features), the first logits
    are tens of units apart and the loss starts at 3-7 instead of ln 2 (measured on the VCF
    study, EfficientNet-B0 from scratch): training spends its budget undoing the draw. A head
    wider than 1.5x the default bound gets ``reset_parameters()`` (the default bound); ResNet
    heads are already within it and stay untouched (same weights for the same seed). Returns
    whether it re-drew the head. A local weight file loaded afterwards still sets the head.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        return False
    default_bound = 1.0 / math.sqrt(head.in_features)
    if float(head.weight.detach().abs().max()) <= 1.5 * default_bound:
        return False
    head.reset_parameters()
    return True


def scale_classifier_init(model: nn.Module, scale: float) -> None:
    """Multiply the random classifier's weights and bias by ``scale`` (1: left as drawn).

    Why offer it: with 0 every first prediction is the same, so the loss starts at its
    chance value and the first steps do not spend themselves undoing a random head; the
    backbone's gradients then start once the head has moved (docs/benchmarks.md measures it).
    """
    if scale < 0:
        raise ValueError(f"model.head_init_scale must be >= 0, got {scale}")
    if scale == 1.0:
        return
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"model.head_init_scale={scale} needs a linear classifier head; "
            f"{type(model).__name__} has {type(head).__name__}"
        )
    with torch.no_grad():
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.mul_(scale)


def resolve_model_name(name: str) -> str:
    """Map our aliases to timm names and reject unknown names with suggestions."""
    key = (name or "").strip()
    if key.lower() == TINY_MODEL_ALIAS:
        return TINY_MODEL
    if timm.is_model(key):
        return key
    close = difflib.get_close_matches(key, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"model.name={name!r} is not a timm model{hint} "
        f"(tested: {', '.join(SUPPORTED_MODELS)}; see timm.list_models())"
    )


def _make_dp_compatible(model: nn.Module, timm_name: str) -> nn.Module:
    from fedmsk.privacy import make_dp_compatible

    model, changes = make_dp_compatible(model)
    for change in changes:
        log.info("%s made DP-compatible: %s", timm_name, change)
    return model


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a flat state dict from a local file, unwrapping common checkpoint layouts.

    Accepts a plain state dict, or one nested under ``state_dict``/``model``/``arrays`` (also
    NumPy values, as in fedmsk checkpoints), with ``module.``/``_module.`` prefixes (DataParallel,
    Opacus) removed. Pickled code is refused (``weights_only=True``).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightFileError(f"{file}: model.pretrained weight file not found")
    try:
        if file.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(file), device="cpu")
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # any decoder failure means an unusable file
        raise WeightFileError(
            f"{file}: cannot read model weights ({type(err).__name__}: {err}); expected a "
            f"PyTorch state dict ({', '.join(WEIGHT_SUFFIXES)})"
        ) from err
    state = _unwrap_state(raw)
    if state is None:
        raise WeightFileError(
            f"{file}: no state dict found (expected a mapping of parameter names to tensors, "
            f"possibly under one of {', '.join(_NESTED_KEYS)})"
        )
    return _strip_prefixes(state)


def _unwrap_state(raw: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(raw, Mapping):
        return None
    if raw and all(_is_array(value) for value in raw.values()):
        return {
            str(key): torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
            for key, v in raw.items()
        }
    for key in _NESTED_KEYS:
        if key in raw:
            found = _unwrap_state(raw[key])
            if found is not None:
                return found
    return None


def _is_array(value: Any) -> bool:
    return torch.is_tensor(value) or isinstance(value, np.ndarray)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("_module.", "module."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _cfg_names(model: nn.Module, field: str) -> list[str]:
    value = getattr(model, "pretrained_cfg", {}).get(field)
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def load_pretrained(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights"
) -> None:
    """Load ``state`` into ``model``, adapting the head and first convolution where needed.

    Any other missing, unexpected or mis-shaped key is an error naming ``source`` and the keys:
    a silently half-loaded model would train, but from the wrong starting point.
    """
    target = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith(_SKIPPED_BUFFER_SUFFIX)}
    heads = _cfg_names(model, "classifier")
    first_convs = _cfg_names(model, "first_conv")
    adapted: dict[str, torch.Tensor] = {}
    reset_head: list[str] = []
    for key, value in state.items():
        if key not in target or tuple(value.shape) == tuple(target[key].shape):
            adapted[key] = value
            continue
        module_name = key.rsplit(".", 1)[0]
        if module_name in heads:
            reset_head.append(key)
        elif module_name in first_convs and key.endswith("weight") and value.ndim == 4:
            adapted[key] = timm.models.adapt_input_conv(target[key].shape[1], value.float())
            log.info(
                "%s: first convolution %s adapted from %d to %d input channels",
                source,
                key,
                value.shape[1],
                target[key].shape[1],
            )
        else:
            raise WeightFileError(
                f"{source}: {key} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target[key].shape)}; the file is for a different architecture"
            )
    wanted = {k for k in target if not k.endswith(_SKIPPED_BUFFER_SUFFIX)}
    missing = sorted(wanted - adapted.keys() - set(reset_head))
    unexpected = sorted(adapted.keys() - target.keys())
    if missing or unexpected:
        raise WeightFileError(
            f"{source}: does not match the model ({len(missing)} missing keys, e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); check "
            "model.name against the architecture the file was saved from"
        )
    if reset_head:
        log.info(
            "%s: classifier head %s has a different class count; it is randomly initialised",
            source,
            ", ".join(reset_head),
        )
    model.load_state_dict(adapted, strict=False)


def _unwrap(model: nn.Module) -> nn.Module:
    """The caller's model inside an Opacus ``GradSampleModule`` wrapper, if any."""
    inner = getattr(model, "_module", None)
    if isinstance(inner, nn.Module) and type(model).__name__.startswith("GradSampleModule"):
        return inner
    return model


def _exchanged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = _unwrap(model).state_dict()
    return {k: v for k, v in state.items() if not k.endswith(_SKIPPED_BUFFER_SUFFIX)}


def get_arrays(model: nn.Module, exclude: Iterable[str] = frozenset()) -> dict[str, np.ndarray]:
    """Copies of every parameter and buffer (state-dict order) except ``exclude`` and the
    ``num_batches_tracked`` counters (see the module docstring)."""
    skip = set(exclude)
    return {
        key: value.detach().cpu().numpy().copy()
        for key, value in _exchanged_state(model).items()
        if key not in skip
    }


def set_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray], strict: bool = True) -> None:
    """Copy ``arrays`` into the model's tensors in place (parameters keep their identity).

    ``strict=True``: every key of :func:`get_arrays` must be present. ``strict=False``: missing
    keys keep their current values (FedBN keeps local norm layers this way). Unknown keys and
    shape mismatches are always errors naming the key, since they mean a different model.
    Nothing is changed when an error is raised.
    """
    state = _exchanged_state(model)
    unknown = sorted(set(arrays) - state.keys() - _skipped_keys(arrays))
    if unknown:
        raise ValueError(
            f"arrays hold {len(unknown)} keys the model does not have, e.g. {unknown[:3]}"
        )
    if strict:
        missing = sorted(state.keys() - arrays.keys())
        if missing:
            raise ValueError(f"arrays lack {len(missing)} model keys, e.g. {missing[:3]}")
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, target in state.items():
        if key not in arrays:
            continue
        value = torch.as_tensor(np.array(arrays[key], copy=True))
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"arrays[{key!r}] has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target.shape)}"
            )
        updates.append((target, value))
    with torch.no_grad():
        for target, value in updates:
            target.copy_(value)


def _skipped_keys(arrays: Mapping[str, Any]) -> set[str]:
    return {key for key in arrays if key.endswith(_SKIPPED_BUFFER_SUFFIX)}


def _norm_types() -> tuple[type[nn.Module], ...]:
    """Normalisation layer classes: torch's, plus timm's that do not subclass them."""
    types: list[type[nn.Module]] = [
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, timm BNAct
        nn.GroupNorm,
        nn.LayerNorm,
        nn.LocalResponseNorm,
    ]
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        types.append(rms)
    import timm.layers as timm_layers

    for attr in dir(timm_layers):
        cls = getattr(timm_layers, attr)
        is_norm_name = any(
            part in attr for part in ("EvoNorm", "FilterResponseNorm", "FrozenBatchNorm", "RmsNorm")
        ) or attr.startswith("SimpleNorm")
        if is_norm_name and isinstance(cls, type) and issubclass(cls, nn.Module):
            types.append(cls)
    return tuple(types)


def local_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in :func:`get_arrays`) of the parameters and buffers of normalisation layers.

    Detected by module type, never by name, so timm's ``BatchNormAct2d`` and the GroupNorm of a
    DP-compatible model count and a convolution called ``bn_proj`` does not. FedBN keeps these
    on the site: pass them as ``exclude`` to :func:`get_arrays` and set with ``strict=False``.
    """
    norm_types = _norm_types()
    exchanged = _exchanged_state(model).keys()
    names: set[str] = set()
    for module_name, module in _unwrap(model).named_modules():
        if not isinstance(module, norm_types):
            continue
        prefix = f"{module_name}." if module_name else ""
        for param_name, _ in module.named_parameters(recurse=False):
            names.add(prefix + param_name)
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is not None:
                names.add(prefix + buffer_name)
    return names & exchanged
