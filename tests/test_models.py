"""fedmsk.models: timm factory, local weights, arrays in/out, norm-layer names for FedBN."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from fedmsk import models
from fedmsk.models import (
    WeightFileError,
    create_model,
    get_arrays,
    local_parameter_names,
    set_arrays,
)

ARCHITECTURES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "mobilenetv3_small_100",
    "mnasnet_100",
    "tiny",
]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("in_chans", [1, 3])
def test_create_model_forward_shape(name: str, in_chans: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=in_chans).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_chans, 32, 32))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()


def test_unknown_model_name_is_named_with_suggestion() -> None:
    with pytest.raises(ValueError, match=r"model.name='resnet19'.*did you mean"):
        create_model("resnet19", num_classes=2, in_chans=1)


def test_any_timm_name_works_and_drop_rate_is_passed() -> None:
    model = create_model("resnet10t", num_classes=2, in_chans=1, drop_rate=0.3)
    assert model.drop_rate == pytest.approx(0.3)


def test_pretrained_none_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    real = models.timm.create_model

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(models.timm, "create_model", spy)
    create_model("tiny", num_classes=2, in_chans=1)
    assert seen["pretrained"] is False


def _same_weights(a: nn.Module, b: nn.Module, skip: set[str] = frozenset()) -> bool:
    sa, sb = get_arrays(a), get_arrays(b)
    return all(np.array_equal(sa[k], sb[k]) for k in sa if k not in skip)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_load_exactly(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    source = create_model("tiny", num_classes=2, in_chans=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    fresh = create_model("tiny", num_classes=2, in_chans=1)
    assert not _same_weights(source, fresh)
    loaded = create_model("tiny", num_classes=2, in_chans=1, pretrained=str(path))
    assert _same_weights(source, loaded)


def test_nested_checkpoint_with_module_prefix(tmp_path) -> None:
    source = create_model("tiny", num_classes=2, in_chans=1)
    nested = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}
    path = tmp_path / "ckpt.pt"
    torch.save(nested, path)
    loaded = create_model("tiny", num_classes=2, in_chans=1, pretrained=str(path))
    assert _same_weights(source, loaded)


def test_head_and_in_chans_mismatch_are_adapted(tmp_path, caplog) -> None:
    source = create_model("tiny", num_classes=1000, in_chans=3)
    path = tmp_path / "imagenet.pth"
    torch.save({"model": source.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="fedmsk.models"):
        loaded = create_model("tiny", num_classes=2, in_chans=1, pretrained=str(path))
    assert loaded.fc.weight.shape == (2, loaded.fc.weight.shape[1])
    assert "classifier head" in caplog.text and "input channels" in caplog.text
    src, dst = get_arrays(source), get_arrays(loaded)
    body = [k for k in dst if not k.startswith(("fc.", "conv1.0."))]
    assert body and all(np.array_equal(src[k], dst[k]) for k in body)
    assert dst["conv1.0.weight"].shape[1] == 1
    np.testing.assert_allclose(
        dst["conv1.0.weight"][:, 0], src["conv1.0.weight"].sum(axis=1), rtol=1e-5, atol=1e-6
    )
    with torch.no_grad():
        assert loaded.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2)


def test_weights_of_another_architecture_name_the_file(tmp_path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(create_model("resnet18", num_classes=2, in_chans=1).state_dict(), path)
    with pytest.raises(WeightFileError, match="r18.pth"):
        create_model("tiny", num_classes=2, in_chans=1, pretrained=str(path))


def test_missing_and_corrupt_weight_files_are_named(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightFileError, match=r"nope\.pth.*not found"):
        create_model("tiny", num_classes=2, in_chans=1, pretrained=str(missing))
    corrupt = tmp_path / "broken.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightFileError, match=r"broken\.pt.*cannot read"):
        create_model("tiny", num_classes=2, in_chans=1, pretrained=str(corrupt))
    not_a_state = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_a_state)
    with pytest.raises(WeightFileError, match=r"list\.pt.*no state dict"):
        create_model("tiny", num_classes=2, in_chans=1, pretrained=str(not_a_state))


def test_get_set_arrays_round_trip() -> None:
    torch.manual_seed(0)
    a = create_model("tiny", num_classes=3, in_chans=1)
    torch.manual_seed(1)
    b = create_model("tiny", num_classes=3, in_chans=1)
    a.train()
    with torch.no_grad():
        a(torch.randn(4, 1, 32, 32))  # move BN running stats away from their init
    arrays = get_arrays(a)
    state_keys = [k for k in a.state_dict() if not k.endswith("num_batches_tracked")]
    assert list(arrays) == state_keys
    assert any(k.endswith("running_mean") for k in arrays)
    assert all(v.dtype.kind == "f" for v in arrays.values())
    param_before = b.fc.weight
    set_arrays(b, arrays)
    assert b.fc.weight is param_before  # in place: optimizers keep working
    assert _same_weights(a, b)
    arrays["fc.weight"][:] = 123.0  # copies: later edits do not leak into the model
    assert not torch.any(b.fc.weight == 123.0)
    a.eval(), b.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_set_arrays_errors_name_the_key() -> None:
    model = create_model("tiny", num_classes=3, in_chans=1)
    arrays = get_arrays(model)
    bad = dict(arrays, **{"fc.weight": np.zeros((5, 5), dtype=np.float32)})
    before = get_arrays(model)
    with pytest.raises(ValueError, match=r"fc\.weight.*\(5, 5\)"):
        set_arrays(model, bad)
    assert _same_weights_dict(before, get_arrays(model))
    with pytest.raises(ValueError, match="lack"):
        set_arrays(model, {k: v for k, v in arrays.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match="not have"):
        set_arrays(model, dict(arrays, extra=np.zeros(1)))


def _same_weights_dict(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_fedbn_style_exclude_and_non_strict_set() -> None:
    model = create_model("tiny", num_classes=2, in_chans=1)
    local = local_parameter_names(model)
    shared = get_arrays(model, exclude=local)
    assert local and not (local & shared.keys())
    other = create_model("tiny", num_classes=2, in_chans=1)
    local_before = {k: v for k, v in get_arrays(other).items() if k in local}
    set_arrays(other, shared, strict=False)
    after = get_arrays(other)
    assert all(np.array_equal(after[k], shared[k]) for k in shared)
    assert all(np.array_equal(after[k], local_before[k]) for k in local)


def _expected_norm_names(model: nn.Module, norm_types: tuple[type, ...]) -> set[str]:
    names = set()
    for module_name, module in model.named_modules():
        if isinstance(module, norm_types):
            for key in module.state_dict():
                if not key.endswith("num_batches_tracked"):
                    names.add(f"{module_name}.{key}")
    return names


def test_local_parameter_names_resnet_batchnorm() -> None:
    model = create_model("resnet18", num_classes=2, in_chans=1)
    names = local_parameter_names(model)
    assert names == _expected_norm_names(model, (nn.BatchNorm2d,))
    assert "bn1.running_var" in names and "layer1.0.bn2.weight" in names
    assert not any("conv" in n or n.startswith("fc.") for n in names)


def test_local_parameter_names_efficientnet_batchnormact() -> None:
    from timm.layers import BatchNormAct2d

    model = create_model("efficientnet_b0", num_classes=2, in_chans=1)
    assert any(type(m) is BatchNormAct2d for m in model.modules())
    names = local_parameter_names(model)
    assert names == _expected_norm_names(model, (BatchNormAct2d,))
    assert "bn1.weight" in names and "bn1.running_mean" in names


def test_local_parameter_names_by_type_not_by_name() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn_proj = nn.Conv2d(1, 4, 3)  # "bn" in the name but not a norm layer
            self.stem_norm = nn.GroupNorm(2, 4)
            self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.LayerNorm([4]))
            self.head = nn.Linear(4, 2)

    names = local_parameter_names(Net())
    assert names == {
        "stem_norm.weight",
        "stem_norm.bias",
        "block.1.weight",
        "block.1.bias",
    }


def test_dp_compatible_variant_has_no_batchnorm() -> None:
    pytest.importorskip("fedmsk.privacy")
    model = create_model("efficientnet_b0", num_classes=2, in_chans=1, dp_compatible=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    names = local_parameter_names(model)
    assert names and names == _expected_norm_names(model, (nn.GroupNorm,))
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 2)


def test_model_config_passes_timm_kwargs_and_keys_the_pool() -> None:
    from fedmsk.config import compose
    from fedmsk.models import model_arguments, model_from_config

    slim = compose(["model=resnet18_slim"])
    model = model_from_config(slim)
    assert model.fc.in_features == slim.model.timm_kwargs["channels"][-1]
    assert sum(p.numel() for p in model.parameters()) < 4_000_000
    out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 2)
    full = model_arguments(compose(["model=resnet18"]))
    assert tuple(model_arguments(slim).items()) != tuple(full.items())
    hash(tuple(model_arguments(slim).items()))  # usable as a ModelPool key


def _model_groups_with_timm_kwargs() -> list[str]:
    from pathlib import Path

    import yaml

    groups = Path(__file__).resolve().parents[1] / "configs" / "model"
    return sorted(
        path.stem
        for path in groups.glob("*.yaml")
        if (yaml.safe_load(path.read_text()) or {}).get("timm_kwargs")
    )


@pytest.mark.parametrize("group", _model_groups_with_timm_kwargs())
def test_every_timm_argument_of_a_model_group_changes_the_network(group: str) -> None:
    """A setting timm ignores would still be shown in the label and the report (the slim group
    once named a 32-wide stem while timm kept its 7x7 stem 64 wide): each argument must change
    the built network's structure."""
    from fedmsk.config import compose

    model_cfg = compose([f"model={group}"]).model
    kwargs = dict(model_cfg.timm_kwargs)
    name = models.resolve_model_name(str(model_cfg.name))

    def structure(arguments: dict) -> str:
        net = create_model(name, num_classes=2, in_chans=1, timm_kwargs=arguments)
        shapes = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
        return repr(net) + repr(shapes)

    built = structure(kwargs)
    for key in kwargs:
        without = {k: v for k, v in kwargs.items() if k != key}
        assert structure(without) != built, f"configs/model/{group}.yaml: timm ignores {key}"


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100", "mnasnet_100"])
def test_wide_classifier_init_is_bounded_and_the_first_loss_is_near_chance(name: str) -> None:
    """timm's TF-style heads draw from U(+-1/sqrt(classes)): with 2 classes the first loss was
    2.7 (EfficientNet-B0), 1.1 (MobileNetV3) and 5.0 (MnasNet) on this batch."""
    import math

    import timm

    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 64, 64), torch.arange(16) % 2
    model = create_model(name, num_classes=2, in_chans=1).train()
    head = model.get_classifier()
    assert float(head.weight.detach().abs().max()) <= 1 / math.sqrt(head.in_features)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(model(x), y))
    assert loss < 0.9  # ln 2 = 0.69
    torch.manual_seed(0)
    raw = timm.create_model(name, num_classes=2, in_chans=1).train()
    assert models.bound_classifier_init(raw) is True


def test_resnet_classifier_init_is_left_as_timm_draws_it() -> None:
    import timm

    torch.manual_seed(0)
    ours = create_model("resnet18", num_classes=2, in_chans=1)
    torch.manual_seed(0)
    raw = timm.create_model("resnet18", num_classes=2, in_chans=1)
    assert models.bound_classifier_init(raw) is False
    assert torch.equal(ours.get_classifier().weight, raw.get_classifier().weight)


def test_head_init_scale_scales_the_drawn_classifier() -> None:
    torch.manual_seed(0)
    drawn = create_model("resnet18", num_classes=2, in_chans=1).get_classifier()
    torch.manual_seed(0)
    halved = create_model("resnet18", num_classes=2, in_chans=1, head_init_scale=0.5)
    assert torch.allclose(halved.get_classifier().weight, 0.5 * drawn.weight)
    zero = create_model("resnet18", num_classes=2, in_chans=1, head_init_scale=0.0).eval()
    with torch.no_grad():
        logits = zero(torch.randn(4, 1, 32, 32))
    assert torch.count_nonzero(logits) == 0  # every first prediction is the same: loss ln 2
    with pytest.raises(ValueError, match="head_init_scale"):
        create_model("resnet18", num_classes=2, in_chans=1, head_init_scale=-1.0)


def test_head_init_scale_reaches_the_model_from_the_config() -> None:
    from fedmsk.config import compose

    assert models.model_arguments(compose(["model.head_init_scale=0.5"]))["head_init_scale"] == 0.5


def test_model_label_names_the_slim_widths_and_not_dropped_ones() -> None:
    from fedmsk.config import compose

    slim = compose([]).model  # the default group: half-width ResNet-18
    label = models.model_label(slim)
    assert label.startswith("resnet18 (") and "channels=32 64 128 256" in label
    assert "output_stride=16" in label
    # the report shows it as it is: its PHI filter once withheld it (too long, and "32-64-128"
    # read as a date)
    from fedmsk.report_data import _run_info

    assert _run_info({"model": label}, None).fields["model"] == label
    assert models.model_label(compose(["model=resnet18"]).model) == "resnet18"
    # slim kwargs given to another architecture are dropped, so the label does not show them
    assert models.model_label(compose(["model.name=resnet50"]).model) == "resnet50"


def _stem_stride(model: nn.Module, key: str) -> int:
    module = model.maxpool if key == "stem_pool_stride" else model.conv1
    stride = module.stride
    return stride if isinstance(stride, int) else stride[0]


@pytest.mark.parametrize(
    ("group", "key"),
    [("resnet18_slim_pool4", "stem_pool_stride"), ("resnet18_slim_conv4", "stem_conv_stride")],
)
def test_a_stride_4_stem_reads_128_px_at_the_map_sizes_of_64(tmp_path, group: str, key: str):
    """Either stride-4 group at 128 px reaches every residual stage at the size the slim
    network has at 64 px, keeps the same weights (a plain slim file loads), and says so in its
    label."""
    from fedmsk.config import compose
    from fedmsk.models import model_arguments, model_from_config

    torch.manual_seed(0)
    plain = model_from_config(compose(["model=resnet18_slim"])).eval()
    cfg = compose([f"model={group}"])
    model = model_from_config(cfg).eval()
    assert _stem_stride(model, key) == 4 and _stem_stride(plain, key) == 2
    with torch.no_grad():
        fine = model.forward_features(torch.rand(2, 1, 128, 128))
        coarse = plain.forward_features(torch.rand(2, 1, 64, 64))
        as_plain = model.forward_features(torch.rand(2, 1, 64, 64))
        stem_map = model.maxpool(model.act1(model.bn1(model.conv1(torch.rand(2, 1, 128, 128)))))
        plain_stem_map = plain.maxpool(plain.act1(plain.bn1(plain.conv1(torch.rand(2, 1, 64, 64)))))
    assert fine.shape == coarse.shape == (2, 256, 4, 4)
    assert stem_map.shape == plain_stem_map.shape == (2, 64, 16, 16)
    assert as_plain.shape[-2:] == (2, 2)  # the same stride at 64 px halves the maps again
    assert f"{key}=4" in models.model_label(cfg.model)
    assert key not in models.model_label(compose(["model=resnet18_slim"]).model)
    assert model_arguments(cfg) != model_arguments(compose(["model=resnet18_slim"]))
    assert model_arguments(cfg)[key] == 4
    path = tmp_path / "slim.pth"
    torch.save(plain.state_dict(), path)
    loaded = create_model(**{**model_arguments(cfg), "pretrained": str(path)})
    for name, value in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("group", "key"),
    [("resnet18_slim_pool4", "stem_pool_stride"), ("resnet18_slim_conv4", "stem_conv_stride")],
)
def test_a_stem_stride_names_a_network_without_that_stem(group: str, key: str) -> None:
    from fedmsk.config import compose

    with pytest.raises(ValueError, match=rf"{key}=4.*efficientnet_b0 has none"):
        create_model("efficientnet_b0", num_classes=2, in_chans=1, **{key: 4})
    with pytest.raises(ValueError, match=r"must be >= 1"):
        create_model("resnet18", num_classes=2, in_chans=1, **{key: 0})
    # set by value over the group, another network drops it with the slim widths
    other = compose([f"model={group}", "model.name=efficientnet_b0"])
    assert models.model_label(other.model) == "efficientnet_b0"
    assert models.model_arguments(other)[key] is None
