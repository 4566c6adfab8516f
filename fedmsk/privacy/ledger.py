"""A site's lifetime privacy ledger: every DP-SGD step ever taken on its images, under a cap
that only the hospital sets.

Why: a budget kept per run restarts whenever a coordinator changes a seed, a learning rate, a
round count or a run name, so "epsilon at most 8" would hold per run and nothing would bound
the sum. The ledger lives with the data (``SITE_DIR/.fedmsk/privacy-ledger.json``), composes
the steps of every run that trained there (RDP composition; an RDP history gives epsilon at any
delta, so the hospital may later tighten its delta), and is compared with the cap and delta of
the site's policy file (``SITE_DIR/privacy-policy.toml``), which no run setting can raise or
reset. Without a policy file the defaults below apply.

A site that trained under DP before it had a ledger starts it from the histories its per-run
states hold (``SITE_DIR/.fedmsk/runs/*/privacy.json``), so an upgrade does not forget them.

A round reserves its steps in the ledger before it trains and settles them after: a node that
crashes mid-round may already have sent its noisy update, so a reservation that is never settled
keeps counting. Reads and writes of the ledger hold an exclusive file lock, so two runs training
on the same site at once cannot both spend the last of the budget.

Nothing here names a path in a message that leaves the node: errors name the file by its name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmsk.privacy.accounting import (
    DEFAULT_DELTA,
    EPSILON_SLACK,
    BudgetExhaustedError,
    History,
    check_delta,
    epsilon_for,
    noise_within,
)
from fedmsk.run_dir import atomic_write_bytes

POLICY_FILE = "privacy-policy.toml"
LEDGER_FILE = "privacy-ledger.json"
LEDGER_VERSION = 1
STATE_DIR = ".fedmsk"  # fedmsk.site_runtime.STATE_DIR_NAME (not imported: that module is heavy)
# A hospital that writes no policy gets this lifetime cap on its data set: about one run at
# the project's epsilon-8 setting. More runs need a policy file that says so.
DEFAULT_LIFETIME_EPSILON = 10.0
# What is left of a cap is not spent at any price: at a noise multiplier above this an update is
# mostly noise, useless to the site and harmful to the federation's average, so a site whose
# remaining budget would need more stops instead (a run that asks for more noise itself keeps it).
LIFETIME_NOISE_LIMIT = 10.0
_POLICY_KEYS = ("lifetime_epsilon", "delta")


class PolicyError(ValueError):
    """The site's privacy policy file cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class SitePolicy:
    """The hospital's own limits for its data set: lifetime epsilon and the delta it is read at."""

    lifetime_epsilon: float = DEFAULT_LIFETIME_EPSILON
    delta: float = DEFAULT_DELTA
    source: str = "default"  # POLICY_FILE when the site wrote one


def read_policy(site_dir: Path | str) -> SitePolicy:
    """The policy in ``SITE_DIR/privacy-policy.toml``, or the defaults when there is none."""
    path = Path(site_dir) / POLICY_FILE
    if not path.is_file():
        return SitePolicy()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise PolicyError(f"{POLICY_FILE}: cannot be read ({err})") from err
    unknown = sorted(set(raw) - set(_POLICY_KEYS))
    if unknown:
        raise PolicyError(
            f"{POLICY_FILE}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_POLICY_KEYS)}"
        )
    values: dict[str, float] = {}
    for key in _POLICY_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PolicyError(f"{POLICY_FILE}: {key} must be a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise PolicyError(f"{POLICY_FILE}: {key} must be a positive number, got {value!r}")
        values[key] = float(value)
    if values.get("delta", DEFAULT_DELTA) >= 1:
        raise PolicyError(f"{POLICY_FILE}: delta must be below 1, got {values['delta']!r}")
    return SitePolicy(**values, source=POLICY_FILE)


def policy_text(lifetime_epsilon: float, delta: float = DEFAULT_DELTA, why: str = "") -> str:
    """A policy file's text, for sites set up by a program (the synthetic generator)."""
    comment = "".join(f"# {line}\n" for line in why.splitlines())
    return (
        "# fedmsk privacy policy of this site's data set: read only on this node.\n"
        f"{comment}"
        f"lifetime_epsilon = {float(lifetime_epsilon)!r}\n"
        f"delta = {float(delta)!r}\n"
    )


@dataclass(frozen=True)
class LedgerEntry:
    """One training round's DP-SGD steps on this site (``settled`` once the round ended)."""

    run: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    settled: bool

    def as_history(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


class SiteLedger:
    """The lifetime ledger of one site's data set (see the module docstring)."""

    def __init__(self, site_dir: Path | str, policy: SitePolicy | None = None) -> None:
        self.site_dir = Path(site_dir)
        self.policy = policy if policy is not None else read_policy(self.site_dir)
        self.path = self.site_dir / STATE_DIR / LEDGER_FILE

    # reading

    def entries(self) -> list[LedgerEntry]:
        with self._locked():
            return self._read()

    def history(self) -> History:
        return [entry.as_history() for entry in self.entries()]

    def spent(self) -> float:
        """Lifetime epsilon of every step recorded, reserved ones included, at the policy delta."""
        return self.projected([])

    def projected(self, extra: History) -> float:
        """Lifetime epsilon once ``extra`` steps are added to what is recorded."""
        return self._epsilon(self.entries(), extra)

    def within_cap(self, epsilon: float) -> bool:
        return epsilon <= self.policy.lifetime_epsilon * (1 + EPSILON_SLACK)

    def noise_for(self, *, sample_rate: float, steps: int, at_least: float) -> float | None:
        """The least noise (not below ``at_least``) at which ``steps`` more steps stay within
        the lifetime cap; None when none up to :data:`LIFETIME_NOISE_LIMIT` does."""
        return noise_within(
            self.history(),
            cap=self.policy.lifetime_epsilon,
            delta=self.policy.delta,
            sample_rate=sample_rate,
            steps=steps,
            at_least=at_least,
            at_most=LIFETIME_NOISE_LIMIT,
        )

    def check_delta(self, num_examples: int) -> float:
        """The policy delta, if it is below ``1 / n`` for this site's training set."""
        return check_delta(self.policy.delta, num_examples, f"{self.policy.source} privacy delta")

    def status(self) -> dict[str, float]:
        """Aggregate numbers for metrics and reports (no run keys, no paths)."""
        return {
            "budget-lifetime-epsilon": float(self.spent()),
            "budget-lifetime-cap": float(self.policy.lifetime_epsilon),
            "budget-lifetime-delta": float(self.policy.delta),
        }

    # writing

    def reserve(self, run: str, *, noise_multiplier: float, sample_rate: float, steps: int) -> int:
        """Record a round's planned steps before it trains; its index in the ledger.

        Raises BudgetExhaustedError (PHI-free) when they would take the site past its cap."""
        entry = LedgerEntry(run, float(noise_multiplier), float(sample_rate), int(steps), False)
        with self._locked():
            entries = self._read()
            projected = self._epsilon(entries, [entry.as_history()])
            if not self.within_cap(projected):
                raise BudgetExhaustedError(self.spent_reason(projected, entries))
            self._write([*entries, entry])
            return len(entries)

    def settle(self, index: int, steps: int) -> None:
        """Replace a reservation by the steps the round really took (never fewer than zero)."""
        with self._locked():
            entries = self._read()
            if not 0 <= index < len(entries):
                raise ValueError(f"{LEDGER_FILE}: no reservation {index} to settle")
            old = entries[index]
            entries[index] = LedgerEntry(
                old.run, old.noise_multiplier, old.sample_rate, max(0, int(steps)), True
            )
            self._write(entries)

    def spent_reason(self, projected: float, entries: list[LedgerEntry] | None = None) -> str:
        entries = self._read() if entries is None else entries
        runs = len({e.run for e in entries})
        spent = self._epsilon(entries)
        return (
            f"this site's lifetime privacy budget is spent: epsilon {spent:.3f} of its cap "
            f"{self.policy.lifetime_epsilon:g} (delta {self.policy.delta:.1e}, from the "
            f"{self.policy.source} policy) over {runs} run(s); another round would reach "
            f"{projected:.3f}, so this site trains no more. Only the hospital can change the cap, "
            f"in {POLICY_FILE}"
        )

    # internals

    def _epsilon(
        self, entries: list[LedgerEntry], extra: Iterable[tuple[float, float, int]] = ()
    ) -> float:
        """RDP composition of ``entries`` and ``extra`` at the policy's delta."""
        return epsilon_for([*(e.as_history() for e in entries), *extra], self.policy.delta, "rdp")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read(self) -> list[LedgerEntry]:
        if not self.path.is_file():
            return self._earlier_runs()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [
                LedgerEntry(
                    str(e["run"]),
                    float(e["noise_multiplier"]),
                    float(e["sample_rate"]),
                    int(e["steps"]),
                    bool(e["settled"]),
                )
                for e in data["entries"]
            ]
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ValueError(
                f"{LEDGER_FILE}: this site's lifetime privacy ledger cannot be read "
                f"({type(err).__name__}). Do not delete it: that would reset the privacy spent on "
                "this data set. Restore it from a backup; until then the site cannot train "
                "under DP."
            ) from err

    def _earlier_runs(self) -> list[LedgerEntry]:
        """Before a site has a ledger, the spends its per-run DP states recorded (runs of
        fedmsk versions without a ledger, or a ledger lost): they count from the start."""
        entries = []
        for state in sorted(self.site_dir.glob(f"{STATE_DIR}/runs/*/privacy.json")):
            try:
                history = json.loads(state.read_text(encoding="utf-8")).get("history", [])
                for sigma, rate, steps in history:
                    entries.append(
                        LedgerEntry(state.parent.name, float(sigma), float(rate), int(steps), True)
                    )
            except (OSError, ValueError, TypeError, AttributeError) as err:
                raise ValueError(
                    f"{LEDGER_FILE}: an earlier run's privacy state ({state.parent.name}) cannot "
                    f"be read ({type(err).__name__}); its spend must count, so restore it first"
                ) from err
        return entries

    def _write(self, entries: list[LedgerEntry]) -> None:
        data: dict[str, Any] = {
            "version": LEDGER_VERSION,
            "entries": [
                {
                    "run": e.run,
                    "noise_multiplier": e.noise_multiplier,
                    "sample_rate": e.sample_rate,
                    "steps": e.steps,
                    "settled": e.settled,
                }
                for e in entries
            ],
        }
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode("utf-8"))
