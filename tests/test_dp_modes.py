"""The per-sample gradient mode a DP-SGD site uses: the fastest that works, timed on random
images, remembered per node and configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("opacus")

from test_privacy import TinyNet, loader  # noqa: E402

from fedmsk.privacy import modes as dp_modes  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore::UserWarning:opacus"),
]


@pytest.fixture(autouse=True)
def _forget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dp_modes, "_REMEMBERED", {})


def test_the_fastest_working_mode_is_chosen_and_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / ".fedmsk" / dp_modes.CACHE_FILE
    timed: list[str] = []

    def fake_seconds(model, mode, inputs, passes, limit=None):  # type: ignore[no-untyped-def]
        timed.append(mode)
        if mode == "ew":
            raise RuntimeError("ExpandedWeights does not support this layer")
        return {"hooks": 0.30, "functorch": 0.10}[mode]

    monkeypatch.setattr(dp_modes, "_pass_seconds", fake_seconds)
    assert dp_modes.fastest_grad_sample_mode(TinyNet(), loader(), cache) == "functorch"
    assert timed == ["hooks", "functorch", "ew"]
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["seconds"] == {"hooks": 0.30, "functorch": 0.10}
    assert entry["dropped"]["ew"].startswith("RuntimeError")
    # a restarted node (nothing in memory) reads its file and does not probe again
    monkeypatch.setattr(dp_modes, "_REMEMBERED", {})
    monkeypatch.setattr(dp_modes, "_pass_seconds", lambda *a, **k: pytest.fail("probed again"))
    assert dp_modes.fastest_grad_sample_mode(TinyNet(), loader(), cache) == "functorch"
    # another input size is another configuration
    monkeypatch.setattr(dp_modes, "_pass_seconds", fake_seconds)
    assert dp_modes.fastest_grad_sample_mode(TinyNet(), loader(size=12), cache) == "functorch"
    assert len(json.loads(cache.read_text())) == 2


def test_a_real_probe_times_working_modes_and_leaves_the_model_clean(tmp_path: Path) -> None:
    model = TinyNet()
    cache = tmp_path / dp_modes.CACHE_FILE
    chosen = dp_modes.fastest_grad_sample_mode(model, loader(), cache)
    assert chosen in dp_modes.PROBED_MODES
    (entry,) = json.loads(cache.read_text()).values()
    assert chosen == min(entry["seconds"], key=entry["seconds"].get)
    assert all(s > 0 for s in entry["seconds"].values())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert all(
        p.grad is None and getattr(p, "grad_sample", None) is None for p in model.parameters()
    )


def test_a_mode_far_slower_than_the_best_stops_after_its_warm_up() -> None:
    inputs = dp_modes.probe_input(loader(), 4)
    assert dp_modes._pass_seconds(TinyNet(), "hooks", inputs, passes=3, limit=0.0) is None
    seconds = dp_modes._pass_seconds(TinyNet(), "hooks", inputs, passes=3, limit=60.0)
    assert seconds is not None and seconds > 0
