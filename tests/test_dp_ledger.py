"""The site's lifetime privacy ledger: one budget per data set, over every run, capped by the
hospital's policy file and by nothing a coordinator sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("opacus")

from test_privacy import TRAIN, TinyNet, loader  # noqa: E402

from fedmsk.config import PrivacyConfig  # noqa: E402
from fedmsk.privacy import BudgetExhaustedError, DPSession  # noqa: E402
from fedmsk.privacy.accounting import derive_noise_multiplier, epsilon_for  # noqa: E402
from fedmsk.privacy.ledger import (  # noqa: E402
    DEFAULT_LIFETIME_EPSILON,
    POLICY_FILE,
    PolicyError,
    SiteLedger,
    policy_text,
    read_policy,
)
from fedmsk.training import fit  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
    pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha"),
    pytest.mark.filterwarnings("ignore::UserWarning:opacus"),
]


def _site(tmp_path: Path, cap: float | None) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    if cap is not None:
        (site / POLICY_FILE).write_text(policy_text(cap), encoding="utf-8")
    return site


def _run(site: Path, run: str, *, eps: float, rounds: int, **privacy: object) -> DPSession:
    """A run's session as a node builds it: a fresh ledger object read from the site's files."""
    return DPSession.for_site(
        PrivacyConfig(enabled=True, target_epsilon=eps, **privacy),  # type: ignore[arg-type]
        state_path=site / ".fedmsk" / "runs" / run / "privacy.json",
        num_examples=16,
        batch_size=4,
        steps_per_round=4,
        planned_rounds=rounds,
        ledger=SiteLedger(site),
        seed=7,
    )


def test_runs_with_different_settings_never_spend_more_than_the_sites_cap(
    tmp_path: Path,
) -> None:
    site = _site(tmp_path, cap=3.0)
    settings = [  # a new target, clipping, accountant or round count: each once a fresh budget
        dict(eps=1.5, rounds=2),
        dict(eps=8.0, rounds=3, max_grad_norm=2.0),
        dict(eps=50.0, rounds=4, accountant="prv"),  # the ledger itself is RDP
    ]
    runs: list[DPSession] = []
    spent: list[float] = []
    for index, setting in enumerate(settings * 2):  # then again, until the site refuses
        dp = _run(site, f"run{index}", **setting)  # type: ignore[arg-type]
        runs.append(dp)
        if not dp.can_train():
            break
        for _ in range(dp.state.planned_rounds + 2):  # try more rounds than planned
            fit(TinyNet(), loader(), TRAIN, 2, privacy=dp)
        assert dp.epsilon <= dp.state.target_epsilon * (1 + 1e-6)
        spent.append(SiteLedger(site).spent())
    assert 1.3 < spent[0] <= 1.5 and not runs[0].messages  # within the cap: as planned
    # the second run's own target (8) is above what is left (about 1.5): its noise was raised
    plain_sigma = derive_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, sample_rate=0.25, total_steps=12
    )
    assert runs[1].state.noise_multiplier > plain_sigma * 1.2
    assert any("lifetime" in m and "raised" in m for m in runs[1].messages)
    assert spent[1] > 2.8  # and what was left is used, not wasted
    assert all(s <= 3.0 * (1 + 1e-6) for s in spent)
    assert spent == sorted(spent)
    # then a run finds nothing left
    late = runs[-1]
    assert 2 <= len(spent) < len(runs) <= 6
    assert not late.can_train() and "lifetime privacy budget is spent" in (late.reason or "")
    status = late.status()
    assert status["budget-exhausted"] == 1.0
    assert status["budget-lifetime-epsilon"] <= status["budget-lifetime-cap"] == 3.0
    result = fit(TinyNet(), loader(), TRAIN, 2, privacy=late)
    assert result.steps == 0 and SiteLedger(site).spent() == pytest.approx(spent[-1])
    # the ledger holds every step every run took, and composes them
    ledger = SiteLedger(site)
    assert sum(e.steps for e in ledger.entries()) == sum(dp.state.steps_taken for dp in runs)
    assert all(e.settled for e in ledger.entries())
    assert ledger.spent() == pytest.approx(epsilon_for(ledger.history(), 1e-5))


def test_a_node_restart_continues_the_ledger(tmp_path: Path) -> None:
    site = _site(tmp_path, cap=None)  # the default cap
    first = _run(site, "a", eps=4.0, rounds=3)
    fit(TinyNet(), loader(), TRAIN, 2, privacy=first)
    after_one = SiteLedger(site).spent()
    assert 0 < after_one < 4.0
    # the node restarts: new session and ledger objects from the same files
    again = _run(site, "a", eps=4.0, rounds=3)
    assert again.epsilon == pytest.approx(first.epsilon)
    assert again.status()["budget-lifetime-epsilon"] == pytest.approx(after_one)
    assert again.status()["budget-lifetime-cap"] == DEFAULT_LIFETIME_EPSILON
    fit(TinyNet(), loader(), TRAIN, 2, privacy=again)
    assert SiteLedger(site).spent() > after_one * 1.2
    assert [e.steps for e in SiteLedger(site).entries()] == [4, 4]


def test_a_round_that_never_ends_keeps_counting(tmp_path: Path) -> None:
    """A node that dies mid-round may have sent its noisy update: its steps stay spent."""
    site = _site(tmp_path, cap=None)
    dp = _run(site, "a", eps=4.0, rounds=3)
    model = TinyNet()
    dp.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader())
    (entry,) = SiteLedger(site).entries()  # no after_fit: the process "crashed"
    assert not entry.settled and entry.steps == 4
    assert SiteLedger(site).spent() > 0


def test_a_round_past_the_cap_is_refused_when_it_reserves(tmp_path: Path) -> None:
    """Two runs that both checked the budget cannot both spend its last part."""
    site = _site(tmp_path, cap=1.0)
    one, two = _run(site, "a", eps=1.0, rounds=1), _run(site, "b", eps=1.0, rounds=1)
    assert one.can_train() and two.can_train()  # both checked before either trained
    fit(TinyNet(), loader(), TRAIN, 2, privacy=one)
    model = TinyNet()
    with pytest.raises(BudgetExhaustedError, match="lifetime privacy budget is spent"):
        two.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader())
    assert not any(m._forward_hooks for m in model.modules())  # unhooked again
    assert len(SiteLedger(site).entries()) == 1


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("lifetime_epsilon = 5\nepsilon = 3\n", "unknown key"),
        ("lifetime_epsilon = -1\n", "positive"),
        ("lifetime_epsilon = 'ten'\n", "must be a number"),
        ("delta = 2.0\n", "below 1"),
        ("lifetime_epsilon = = 3\n", "cannot be read"),
    ],
)
def test_a_bad_policy_file_is_named_with_its_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    site = _site(tmp_path, cap=None)
    (site / POLICY_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(PolicyError, match=problem) as err:
        read_policy(site)
    assert POLICY_FILE in str(err.value) and str(tmp_path) not in str(err.value)


def test_policy_delta_must_be_below_one_over_n(tmp_path: Path) -> None:
    site = _site(tmp_path, cap=None)
    (site / POLICY_FILE).write_text("delta = 0.1\n", encoding="utf-8")
    assert read_policy(site).delta == 0.1
    with pytest.raises(ValueError, match="not below 1/n"):
        _run(site, "a", eps=4.0, rounds=1)
    (site / POLICY_FILE).write_text("lifetime_epsilon = 6\ndelta = 1e-6\n", encoding="utf-8")
    dp = _run(site, "a", eps=4.0, rounds=1)
    assert dp.state.target_delta == 1e-6 and dp.status()["budget-lifetime-delta"] == 1e-6


def test_an_unreadable_ledger_stops_training_instead_of_resetting(tmp_path: Path) -> None:
    site = _site(tmp_path, cap=None)
    fit(TinyNet(), loader(), TRAIN, 2, privacy=_run(site, "a", eps=4.0, rounds=2))
    ledger = SiteLedger(site)
    ledger.path.write_text("{ not json", encoding="utf-8")
    with pytest.raises(ValueError, match="Do not delete it") as err:
        _run(site, "b", eps=4.0, rounds=2)
    assert str(tmp_path) not in str(err.value)


def test_a_site_runtime_whose_cap_is_spent_refuses_to_train(tmp_path: Path) -> None:
    """Through the node's runtime: a second run on the same data finds the cap spent."""
    from test_site_runtime import write_site  # a 20-image PNG site

    from fedmsk.config import compose
    from fedmsk.models import get_arrays
    from fedmsk.site_runtime import SiteRuntime, SiteUnavailableError

    site = write_site(tmp_path / "site-a")
    (site / POLICY_FILE).write_text(policy_text(2.0), encoding="utf-8")

    def runtime(run: str) -> SiteRuntime:
        cfg = compose(
            [
                "model=resnet18_slim",
                "privacy=dp",
                "data.image_size=32",
                "train.batch_size=8",
                "federation.num_rounds=1",
                f"run_dir={tmp_path / run}",
            ]
        )
        return SiteRuntime(cfg, site, "site-a", heldout=False, seed=3)

    first = runtime("run-1")
    outcome = first.train(get_arrays(first.model), server_round=1)
    assert 0 < outcome.metrics["epsilon"] <= 2.0
    assert (site / ".fedmsk" / "dp-modes.json").is_file()  # the timed mode choice, kept
    second = runtime("run-2")  # a new run: new settings hash, same data set
    status = second.privacy_status()
    assert status["budget-exhausted"] == 1.0
    assert 0 < status["budget-lifetime-epsilon"] <= status["budget-lifetime-cap"] == 2.0
    with pytest.raises(SiteUnavailableError, match="privacy budget"):
        second.train(get_arrays(second.model), server_round=1)


def test_spends_recorded_before_the_site_had_a_ledger_count_from_the_start(
    tmp_path: Path,
) -> None:
    """A site upgraded from a fedmsk without a ledger keeps what its earlier runs spent."""
    import json

    site = _site(tmp_path, cap=5.0)
    old_state = site / ".fedmsk" / "runs" / "0123abcd" / "privacy.json"
    old_state.parent.mkdir(parents=True)
    history = [[1.5, 0.25, 2], [1.5, 0.25, 2]]  # epsilon about 2.5
    old_state.write_text(json.dumps({"target_epsilon": 8.0, "history": history}))
    ledger = SiteLedger(site)
    earlier = epsilon_for([tuple(h) for h in history], 1e-5)  # type: ignore[misc]
    assert ledger.spent() == pytest.approx(earlier) and earlier > 1.0
    dp = _run(site, "new", eps=8.0, rounds=2)  # what is left is less than its target
    assert any("raised" in m for m in dp.messages)
    fit(TinyNet(), loader(), TRAIN, 2, privacy=dp)
    entries = SiteLedger(site).entries()
    assert [e.run for e in entries] == ["0123abcd", "0123abcd", "new"]  # now on file
    assert earlier < SiteLedger(site).spent() <= 5.0 * (1 + 1e-6)
