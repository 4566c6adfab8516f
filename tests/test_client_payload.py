"""What leaves a hospital node, checked on the real ClientApp handlers.

A site of real DICOM files whose headers and manifest carry distinctive fake PHI is trained
and evaluated through ``client.app``'s handlers; every value in every reply is searched for
those strings, for file paths and for per-image data.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from fedmsk.config import overrides_to_run_config
from fedmsk.data.dicom_write import DicomPHI, write_dicom
from fedmsk.data.manifest import ManifestRow, write_manifest
from fedmsk.models import create_model, get_arrays

PATIENT = "ZZPHIPATIENTQX"
NAME = "Quixotic^Phiname"
INSTITUTION = "Phiville Secret Hospital"
DATE = "19370203"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("phi-site-secretfolder") / "hospital-a"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = i % 2
        pixels = rng.normal(1500, 200, (40, 40))
        if label:
            pixels[12:28, 18:22] += 900
        name = f"images/{PATIENT}{i // 2}_{i}.dcm"
        phi = DicomPHI(
            patient_name=f"{NAME}{i // 2}",
            patient_id=f"{PATIENT}{i // 2}",
            birth_date=DATE,
            study_date=DATE,
            institution_name=INSTITUTION,
        )
        write_dicom(root / name, np.clip(pixels, 0, 4095).astype(np.uint16), phi=phi)
        rows.append(ManifestRow(name, ["normal", "fracture"][label], f"{PATIENT}{i // 2}"))
    rows.append(ManifestRow("images/broken.dcm", "normal", f"{PATIENT}99"))
    (root / "images" / "broken.dcm").write_bytes(b"DICM but not really")
    write_manifest(root, rows)
    return root


def _context(site: Path, tmp: Path, heldout: bool = False, *extra: str) -> Context:
    overrides = [
        f"federation.heldout_sites=[{'hospital-a' if heldout else ''}]",
        f"data.root={site.parent}",
        "data.image_size=32",
        "model=resnet18",
        "train.batch_size=8",
        f"run_dir={tmp / 'run'}",
        "federation.sites=[hospital-a]",
        *extra,
    ]
    return Context(
        run_id=1,
        node_id=7,
        node_config={"data-dir": str(site), "site-alias": "hospital-a"},
        state=RecordDict(),
        run_config=overrides_to_run_config(overrides),
    )


def _global_arrays(dp_compatible: bool = False) -> ArrayRecord:
    model = create_model("resnet18", num_classes=2, in_chans=1, dp_compatible=dp_compatible)
    return ArrayRecord(OrderedDict((k, Array(v)) for k, v in get_arrays(model).items()))


@pytest.fixture(autouse=True)
def _identity(flower_task_identity: None) -> None:
    return None


def _message(kind: str, config: dict, dp_compatible: bool = False) -> Message:
    arrays = _global_arrays(dp_compatible)
    content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
    return Message(content, dst_node_id=7, message_type=kind)


def _everything_sent(reply: Message) -> str:
    """Every key and value of a reply as text (arrays as their names, shapes and dtypes)."""
    if reply.has_error():
        return json.dumps({"code": reply.error.code, "reason": reply.error.reason})
    parts = []
    for name, record in reply.content.items():
        parts.append(name)
        if isinstance(record, ArrayRecord):
            parts += [f"{k}{tuple(v.shape)}{v.dtype}" for k, v in record.items()]
        else:
            parts += [f"{k}={v}" for k, v in dict(record).items()]
    return "\n".join(parts)


def _assert_no_phi(text: str, site: Path) -> None:
    for secret in (
        PATIENT,
        "Quixotic",
        "Phiname",
        INSTITUTION,
        "Phiville",
        DATE,
        "secretfolder",
        str(site),
        "broken.dcm",
        ".dcm",
    ):
        assert secret not in text, f"{secret!r} left the node"


def test_train_reply_carries_arrays_count_and_metrics_only(site: Path, tmp_path: Path) -> None:
    reply = client_app._handle(
        _message("train", {"fedmsk-round": 1}), _context(site, tmp_path), "train"
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.keys()) == {"arrays", "metrics"}
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] > 0
    assert all(isinstance(v, int | float) for v in metrics.values())
    _assert_no_phi(_everything_sent(reply), site)


def test_under_dp_a_train_reply_carries_only_what_the_accountant_covers(
    site: Path, tmp_path: Path
) -> None:
    """No training loss, timings or images/s: they depend on the (sampled) training images."""
    context = _context(site, tmp_path, False, "privacy=dp")
    message = _message("train", {"fedmsk-round": 1}, dp_compatible=True)
    reply = client_app._handle(message, context, "train")
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "epsilon", "train-steps"}
    assert 0 < metrics["epsilon"] <= 8.0
    # the node keeps the rest in its own log
    assert "train-loss" in (site / ".fedmsk" / "logs" / "node.log").read_text()
    stats = client_app._handle(message, context, "norm-stats")
    assert stats.has_error() and "SiteUnavailableError" in stats.error.reason


def test_secagg_size_query_gets_a_power_of_two_bound_and_the_alias_only(
    site: Path, tmp_path: Path
) -> None:
    context = _context(site, tmp_path, False, "privacy=secagg")
    reply = client_app._handle(_message("query", {}), context, "count-bound")
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    detail = dict(reply.content["detail"])
    assert set(detail) == {"site-alias", "train-count-bound"}
    from client.node import config_for
    from fedmsk.site_runtime import SiteRuntime

    count = SiteRuntime(config_for(context), site, "hospital-a", False, 0).train_count()
    bound = int(detail["train-count-bound"])
    assert bound & (bound - 1) == 0 and count <= bound < 2 * count
    _assert_no_phi(_everything_sent(reply), site)


def test_evaluate_reply_is_aggregate_only(site: Path, tmp_path: Path) -> None:
    reply = client_app._handle(
        _message("evaluate", {"fedmsk-round": 1, "threshold": 0.5}),
        _context(site, tmp_path, heldout=True),
        "evaluate",
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    text = _everything_sent(reply)
    _assert_no_phi(text, site)
    summary = json.loads(str(reply.content["detail"]["summary"]))
    n = summary["n"]

    # Aggregate only: no list in the summary is as long as the number of images evaluated
    # (the ROC is on a fixed 101-point grid), so no per-image score can be carried.
    def lengths(value):  # noqa: ANN001, ANN202
        if isinstance(value, list):
            yield len(value)
            for item in value:
                yield from lengths(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from lengths(item)

    assert n > 3 and n not in set(lengths(summary))
    assert len(summary["roc"]["fpr"]) == 101
    assert "trained-in" not in reply.content["detail"]  # a held-out node never trains


def test_a_training_nodes_evaluate_reply_names_the_precision_it_trains_in(
    site: Path, tmp_path: Path
) -> None:
    context = _context(site, tmp_path, False, "train.precision=fp32")
    reply = client_app._handle(
        _message("evaluate", {"fedmsk-round": 1, "threshold": 0.5}), context, "evaluate"
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert str(reply.content["detail"]["trained-in"]) == "fp32"


def test_unreadable_file_is_named_only_in_the_site_log(site: Path, tmp_path: Path) -> None:
    client_app._handle(_message("train", {"fedmsk-round": 1}), _context(site, tmp_path), "train")
    node_log = (site / ".fedmsk" / "logs" / "node.log").read_text()
    assert "broken.dcm" in node_log


def test_failure_reply_names_site_and_error_class_only(site: Path, tmp_path: Path) -> None:
    context = _context(site, tmp_path)
    context.node_config["data-dir"] = str(site / "no-such-dir" / PATIENT)
    reply = client_app._handle(_message("train", {"fedmsk-round": 1}), context, "train")
    assert reply.has_error()
    assert reply.error.reason.startswith("site=hospital-a error=")
    _assert_no_phi(reply.error.reason, site)


def test_a_node_without_data_dir_is_told_what_to_set(tmp_path: Path) -> None:
    from client.node import NodeConfigError, resolve_site
    from fedmsk.config import compose

    cfg = compose([])
    with pytest.raises(NodeConfigError, match="node config has no 'data-dir'.*--node-config"):
        resolve_site(cfg, {"site-alias": "site01"})
    assert resolve_site(cfg, {"data-dir": str(tmp_path), "site-alias": "site01"}) == (
        tmp_path,
        "site01",
    )


def test_a_packed_train_message_gets_a_packed_reply_with_the_same_arrays(
    site: Path, tmp_path: Path
) -> None:
    """The coordinator sends the model as fedmsk.wire buffers: the node trains on the same
    tensors and answers in the same form, and its layout names layers, nothing of the site."""
    from fedmsk.wire import LAYOUT_KEY, is_packed, pack_arrays, unpack_arrays

    plain = _message("train", {"fedmsk-round": 1})
    arrays = {k: v.numpy() for k, v in plain.content["arrays"].items()}
    packed_record = ArrayRecord(OrderedDict((k, Array(v)) for k, v in pack_arrays(arrays).items()))
    packed = Message(
        RecordDict({"arrays": packed_record, "config": ConfigRecord({"fedmsk-round": 1})}),
        dst_node_id=7,
        message_type="train",
    )
    replies = []
    for index, message in enumerate((plain, packed)):
        context = _context(site, tmp_path / f"run{index}")
        replies.append(client_app._handle(message, context, "train"))
    assert not any(r.has_error() for r in replies)
    from_plain = {k: v.numpy() for k, v in replies[0].content["arrays"].items()}
    sent = {k: v.numpy() for k, v in replies[1].content["arrays"].items()}
    assert not is_packed(from_plain) and is_packed(sent) and len(sent) <= 3
    layout = bytes(sent[LAYOUT_KEY]).decode()
    assert "layer1" in layout
    _assert_no_phi(layout + _everything_sent(replies[1]), site)
    from_packed = unpack_arrays(sent)
    assert list(from_packed) == list(from_plain)
    for key, value in from_plain.items():
        assert from_packed[key].dtype == value.dtype
        np.testing.assert_array_equal(from_packed[key], value, err_msg=key)


def test_a_site_reads_its_own_planned_rounds_and_ignores_what_it_cannot_read() -> None:
    key = client_app.PLANNED_VISITS_KEY
    plan = ConfigRecord({key: json.dumps({"site-a": 3, "site-b": 7})})
    assert client_app.planned_rounds(plan, "site-a") == 3
    assert client_app.planned_rounds(plan, "site-b") == 7
    assert client_app.planned_rounds(plan, "site-c") is None  # not in the plan: every round
    assert client_app.planned_rounds(ConfigRecord(), "site-a") is None
    for text in ("not json", "[3]", json.dumps({"site-a": 0}), json.dumps({"site-a": "3"})):
        assert client_app.planned_rounds(ConfigRecord({key: text}), "site-a") is None, text
