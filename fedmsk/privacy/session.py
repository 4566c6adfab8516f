"""DP-SGD for one site and run with Opacus, with a budget that spans the whole federation.

Each training site runs DP-SGD (per-sample clipping, Gaussian noise, Poisson sampling). The noise
multiplier is derived once per site and run from the target (epsilon, delta), the site's sample
rate and the *planned* number of local steps over all rounds, so that the budget covers the whole
federation rather than one round. The accountant's history is kept on the node in a JSON file
(one per site and run) and survives restarts of the node; every round adds the steps it really
took. A site whose next round would push epsilon above its target does not train again
(:meth:`DPSession.can_train` is False and :attr:`DPSession.reason` says why); the federation goes on
with the other sites.

Above every run's budget stands the site's lifetime budget (:mod:`fedmsk.privacy.ledger`): the
hospital's cap on the privacy spent on its data set over all runs, whatever their settings. A
run's noise is raised where its own target would overrun what is left of the cap, every round
reserves its steps in the site's ledger before it trains, and a site whose cap is reached trains
no more. Delta is the site's policy value (default 1e-5, always below ``1/n``) unless the run sets
``privacy.target_delta``; the lifetime cap is read at the policy's delta.

Nothing here leaves the node except :meth:`DPSession.status` (aggregate numbers) and messages
that name settings, never paths or images.
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from fedmsk.config import PrivacyConfig
from fedmsk.privacy import modes as dp_modes
from fedmsk.privacy.accounting import (
    EPSILON_SLACK,
    BudgetExhaustedError,
    History,
    accountant_with,
    default_delta,
    derive_noise_multiplier,
    epsilon_for,
    planned_sample_rate,
    steps_in,
)
from fedmsk.privacy.compat import (
    DPCompatibilityError,
    model_name,
    validation_errors,
)
from fedmsk.privacy.ledger import LIFETIME_NOISE_LIMIT, SiteLedger
from fedmsk.privacy.modes import choose_grad_sample_mode
from fedmsk.privacy.randomness import require_secure_mode_dependency, secret_generator
from fedmsk.run_dir import atomic_write_bytes

__all__ = ["ACCOUNTANTS", "DPSession", "EmptyBatchSafe", "PrivacyState"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
ACCOUNTANTS = ("rdp", "prv")
# fit() calls criterion(model(x), y) then loss.backward(): ghost clipping needs Opacus' own
# two-pass criterion, which that loop cannot use, so a request for it falls back to these.
_FIT_FALLBACKS = ("hooks", "functorch")

# -- persisted state ----------------------------------------------------------------------------


@dataclass
class PrivacyState:
    """Everything a site must remember between rounds and restarts to account honestly."""

    target_epsilon: float
    target_delta: float
    max_grad_norm: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    num_examples: int
    steps_per_round: int
    planned_rounds: int
    history: History = field(default_factory=list)
    steps_taken: int = 0
    rounds_trained: int = 0
    epsilon_spent: float = 0.0
    grad_sample_mode: str | None = None
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = [[float(s), float(q), int(n)] for s, q, n in self.history]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrivacyState:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in known}
        values["history"] = [(float(s), float(q), int(n)) for s, q, n in data.get("history", [])]
        return cls(**values)


def _shown(path: Path) -> str:
    """The state file as it may appear in a message: the site directory's name is left out."""
    parts = path.parts[-4:] if ".fedmsk" in path.parts[-4:] else path.parts[-2:]
    return str(Path(*parts))


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))


def _read_state(path: Path) -> PrivacyState:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return PrivacyState.from_json(data)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(
            f"{_shown(path)}: the privacy accountant state cannot be read ({type(err).__name__}). "
            "Do not delete it to continue the run: that would reset the site's spent budget. "
            "Restore it from a backup or start a new run."
        ) from err


def _check_settings(state: PrivacyState, cfg: PrivacyConfig, delta: float, path: Path) -> None:
    """An ongoing run's budget must not change underfoot: that would void its guarantee."""
    wanted = {
        "privacy.target_epsilon": (state.target_epsilon, float(cfg.target_epsilon)),
        "privacy.target_delta": (state.target_delta, float(delta)),
        "privacy.max_grad_norm": (state.max_grad_norm, float(cfg.max_grad_norm)),
        "privacy.accountant": (state.accountant, str(cfg.accountant).lower()),
    }
    for setting, (saved, now) in wanted.items():
        same = math.isclose(saved, now, rel_tol=1e-9) if isinstance(saved, float) else saved == now
        if not same:
            raise ValueError(
                f"{setting}={now} but this site's ongoing run was accounted with {saved} "
                f"({_shown(path)}): keep the run's privacy settings or start a new run"
            )


# -- per-sample gradient mode -------------------------------------------------------------------


class EmptyBatchSafe(nn.Module):
    """Opacus' wrapped model, made to accept the empty batches Poisson sampling can draw.

    The functorch and expanded-weights modes fail on a batch of zero images. For such a batch
    the plain model runs without gradients (for the output's shape) and every parameter gets an
    empty per-sample gradient, so the DP optimizer still takes its step: noise only, which the
    accountant counts like any other step.
    """

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if inputs.shape[0] > 0:
            return self.wrapped(inputs, *args, **kwargs)
        inner = getattr(self.wrapped, "_module", self.wrapped)
        with torch.no_grad():
            output = inner(inputs, *args, **kwargs)
        for param in inner.parameters():
            if param.requires_grad:
                param.grad_sample = torch.zeros(
                    (0, *param.shape), dtype=param.dtype, device=param.device
                )
        return output.detach().requires_grad_(True)

    def cleanup(self) -> None:
        self.wrapped.cleanup()


# -- the session ---------------------------------------------------------------------------------


class DPSession:
    """DP-SGD for one site and run; implements ``fedmsk.training.PrivacyHook``.

    Build it with :meth:`for_site`, which loads the site's accountant state or starts it (and
    derives the noise multiplier for the planned federation). ``fit`` then calls
    :meth:`can_train`, :meth:`attach` and :meth:`after_fit`; the state file is rewritten after
    every round.
    """

    def __init__(
        self,
        cfg: PrivacyConfig,
        state: PrivacyState,
        state_path: Path,
        *,
        seed: int | None = None,
        ledger: SiteLedger | None = None,
    ) -> None:
        """``seed`` fixes sampling and noise for tests and benchmarks only: with a seed that
        others know, the noise can be recomputed and the guarantee is void. None (the default)
        draws them from the operating system's entropy. ``ledger``: the site's lifetime budget
        (fedmsk.privacy.ledger), checked and charged besides the run's own."""
        self.cfg = cfg
        self.state = state
        self.state_path = Path(state_path)
        self.messages: list[str] = []
        self._wrapped: Any = None
        self._steps_before = 0
        self._seeds = random.Random(seed) if seed is not None else None
        self.ledger = ledger
        self.run_id = self.state_path.parent.name or "run"  # names the run in the site ledger
        self._reservation: int | None = None

    # construction

    @classmethod
    def for_site(
        cls,
        cfg: PrivacyConfig,
        *,
        state_path: Path | str,
        num_examples: int,
        batch_size: int,
        steps_per_round: int,
        planned_rounds: int,
        sample_rate: float | None = None,
        seed: int | None = None,
        ledger: SiteLedger | None = None,
        save: bool = True,
    ) -> DPSession:
        """Load this site's accountant state from ``state_path``, or start it there.

        A new state fixes the noise multiplier so that ``planned_rounds * steps_per_round``
        steps at ``sample_rate`` (default: what Opacus' Poisson loader will use for
        ``num_examples`` and ``batch_size``) spend at most ``cfg.target_epsilon``, and, with a
        site ``ledger``, keep the site within its lifetime cap. An existing state keeps its
        noise multiplier and history; its privacy settings must match ``cfg``. ``save=False``
        starts a new state in memory only (a status asked before the site first trains must
        not fix the noise its first round will plan).
        """
        path = Path(state_path)
        if cfg.target_delta is not None:
            delta = float(cfg.target_delta)
        elif ledger is not None:
            delta = ledger.check_delta(num_examples)
        else:
            delta = default_delta(num_examples)
        mechanism = str(cfg.accountant).lower()
        if mechanism not in ACCOUNTANTS:
            raise ValueError(
                f"privacy.accountant={cfg.accountant!r} is not one of {', '.join(ACCOUNTANTS)}"
            )
        if cfg.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be positive, got {cfg.max_grad_norm}")
        if cfg.secure_mode:
            require_secure_mode_dependency()
            if seed is not None:
                raise ValueError("a fixed DP seed cannot be combined with privacy.secure_mode")
        if path.is_file():
            state = _read_state(path)
            _check_settings(state, cfg, delta, path)
            return cls(cfg, state, path, seed=seed, ledger=ledger)
        rate = (
            sample_rate
            if sample_rate is not None
            else planned_sample_rate(num_examples, batch_size)
        )
        steps_per_round = max(1, int(steps_per_round))
        planned_rounds = max(1, int(planned_rounds))
        sigma = derive_noise_multiplier(
            target_epsilon=float(cfg.target_epsilon),
            target_delta=delta,
            sample_rate=rate,
            total_steps=steps_per_round * planned_rounds,
            accountant=mechanism,
        )
        state = PrivacyState(
            target_epsilon=float(cfg.target_epsilon),
            target_delta=delta,
            max_grad_norm=float(cfg.max_grad_norm),
            accountant=mechanism,
            noise_multiplier=sigma,
            sample_rate=rate,
            num_examples=int(num_examples),
            steps_per_round=steps_per_round,
            planned_rounds=planned_rounds,
        )
        session = cls(cfg, state, path, seed=seed, ledger=ledger)
        session._fit_lifetime_cap()
        if save:
            session.save()
        return session

    @classmethod
    def load(
        cls, cfg: PrivacyConfig, state_path: Path | str, *, seed: int | None = None
    ) -> DPSession:
        """Reopen an existing state file (e.g. after a node restart)."""
        path = Path(state_path)
        if not path.is_file():
            raise FileNotFoundError(f"{_shown(path)}: no privacy accountant state for this run")
        return cls(cfg, _read_state(path), path, seed=seed)

    def save(self) -> None:
        _write_atomically(self.state_path, self.state.to_json())

    # budget

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far by this site in this run."""
        return self.state.epsilon_spent

    def projected_epsilon(self, extra_steps: int | None = None) -> float:
        """Epsilon after one more round (or ``extra_steps`` more steps) at the current noise."""
        steps = self.state.steps_per_round if extra_steps is None else extra_steps
        history = [
            *self.state.history,
            (self.state.noise_multiplier, self.state.sample_rate, steps),
        ]
        return epsilon_for(history, self.state.target_delta, self.state.accountant)

    def can_train(self) -> bool:
        return self.reason is None

    @property
    def reason(self) -> str | None:
        """Why this site may not train another round, or None. Names numbers, never paths."""
        st = self.state
        projected = self.projected_epsilon()
        if projected <= st.target_epsilon * (1 + EPSILON_SLACK):
            if self.ledger is None:
                return None
            lifetime = self.ledger.projected(
                [(st.noise_multiplier, st.sample_rate, st.steps_per_round)]
            )
            return None if self.ledger.within_cap(lifetime) else self.ledger.spent_reason(lifetime)
        return (
            f"privacy budget spent: epsilon {st.epsilon_spent:.3f} of target "
            f"{st.target_epsilon:g} (delta {st.target_delta:.2e}) after {st.rounds_trained} "
            f"round(s) and {st.steps_taken} steps; another round of {st.steps_per_round} steps "
            f"would reach {projected:.3f}, so this site stops training (planned rounds: "
            f"{st.planned_rounds})"
        )

    def status(self) -> dict[str, float]:
        """Aggregate, PHI-free numbers for metrics and reports."""
        st = self.state
        exhausted = not self.can_train()
        return {
            "epsilon": float(st.epsilon_spent),
            "epsilon-target": float(st.target_epsilon),
            "delta": float(st.target_delta),
            "noise-multiplier": float(st.noise_multiplier),
            "budget-exhausted": 1.0 if exhausted else 0.0,
            "budget-rounds-trained": float(st.rounds_trained),
            **(self.ledger.status() if self.ledger is not None else {}),
        }

    # PrivacyHook

    def attach(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, Optimizer, DataLoader]:
        """Wrap the trio for DP-SGD: per-sample gradients, clipping + noise, Poisson sampling."""
        from opacus import PrivacyEngine

        if not self.can_train():
            raise BudgetExhaustedError(self.reason)
        errors = validation_errors(model)
        if errors:
            raise DPCompatibilityError(
                f"model {model_name(model)!r} is not DP-compatible ({errors[0]}): set "
                "model.dp_compatible=true when privacy.enabled=true"
            )
        self._align_sample_rate(1.0 / max(1, len(loader)))
        self._note_sampler(loader)
        mode = self._working_mode(model, loader)
        secure = bool(self.cfg.secure_mode)
        with warnings.catch_warnings():  # "secure RNG off": private seeds are used instead
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant=self.state.accountant, secure_mode=secure)
        engine.accountant = accountant_with(self.state.accountant, self.state.history)
        # Batch membership and noise must be unpredictable to whoever knows the run's seed
        # (the server does): Poisson sampling and noise draw from Opacus's secure generator
        # (privacy.secure_mode), else from generators whose whole state is secret
        # (fedmsk.privacy.randomness), or from a given seed when a test asks for one.
        device = next(model.parameters()).device
        noise_rng = None
        if not secure:
            engine.secure_rng = self._private_generator("cpu")
            noise_rng = self._private_generator(device)
        self._steps_before = steps_in(self.state.history)
        wrapped, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.state.noise_multiplier,
            max_grad_norm=self.state.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=mode,
            loss_reduction="mean",
            noise_generator=noise_rng,
        )
        self._engine = engine
        self._wrapped = EmptyBatchSafe(wrapped)
        if self.ledger is not None:  # last, so that only a round that trains is reserved
            try:
                self._reservation = self.ledger.reserve(
                    self.run_id,
                    noise_multiplier=self.state.noise_multiplier,
                    sample_rate=self.state.sample_rate,
                    steps=self.state.steps_per_round,
                )
            except BaseException:
                self._detach()
                raise
        return self._wrapped, dp_optimizer, dp_loader

    def after_fit(self, steps: int) -> float:
        """Record the round's spend, save the state, unhook the model; return epsilon so far."""
        if self._wrapped is not None:
            history = [tuple(e) for e in self._engine.accountant.history]
            counted = steps_in(history) - self._steps_before
            missing = int(steps) - counted
            if missing > 0:  # steps the hook did not see still spent budget: count them
                history.append((self.state.noise_multiplier, self.state.sample_rate, missing))
            taken = max(int(steps), counted)
            self.state.history = [(float(s), float(q), int(n)) for s, q, n in history]
            self.state.steps_taken += taken
            self.state.rounds_trained += 1 if taken > 0 else 0
            self.state.epsilon_spent = epsilon_for(
                self.state.history, self.state.target_delta, self.state.accountant
            )
            try:
                try:  # first: the spend must be on disk even if unhooking fails
                    if self.ledger is not None and self._reservation is not None:
                        self.ledger.settle(self._reservation, taken)
                        self._reservation = None
                finally:
                    self.save()
            finally:
                self._detach()
        return self.state.epsilon_spent

    # internals

    def _fit_lifetime_cap(self) -> None:
        """Raise a new run's noise where its planned steps would overrun the site's lifetime
        cap: the run's target is then capped by what its site has left."""
        st = self.state
        if self.ledger is None or st.steps_taken > 0:
            return
        planned = st.steps_per_round * st.planned_rounds
        sigma = self.ledger.noise_for(
            sample_rate=st.sample_rate, steps=planned, at_least=st.noise_multiplier
        )
        if sigma is None:  # rounds go on at the run's noise while the cap allows (`reason`)
            self._say(
                f"what is left of this site's lifetime privacy budget (epsilon "
                f"{self.ledger.spent():.3f} of its cap {self.ledger.policy.lifetime_epsilon:g} "
                f"spent) would need a noise multiplier above {LIFETIME_NOISE_LIMIT:g} for all "
                f"of this run's {planned} planned steps: this site trains at the run's noise "
                "until the cap is reached, then stops"
            )
            return
        if sigma <= st.noise_multiplier:
            return
        self._say(
            f"this site has spent lifetime epsilon {self.ledger.spent():.3f} of its cap "
            f"{self.ledger.policy.lifetime_epsilon:g}: the noise multiplier is raised from "
            f"{st.noise_multiplier:.3f} to {sigma:.3f} so that this run's {planned} planned "
            "steps stay within the cap"
        )
        st.noise_multiplier = sigma

    def _detach(self) -> None:
        wrapped, self._wrapped = self._wrapped, None
        cleanup = getattr(wrapped, "cleanup", None)
        if callable(cleanup):
            cleanup()
        self._engine = None

    def _align_sample_rate(self, actual: float) -> None:
        """Keep the accounted sample rate equal to the one the Poisson loader really uses."""
        st = self.state
        if math.isclose(actual, st.sample_rate, rel_tol=1e-9):
            return
        if st.steps_taken == 0:
            st.noise_multiplier = derive_noise_multiplier(
                target_epsilon=st.target_epsilon,
                target_delta=st.target_delta,
                sample_rate=actual,
                total_steps=st.steps_per_round * st.planned_rounds,
                accountant=st.accountant,
            )
            planned, st.sample_rate = st.sample_rate, actual
            self._fit_lifetime_cap()
            self._say(
                f"sample rate is {actual:.4g}, not the planned {planned:.4g}: "
                f"noise multiplier re-derived as {st.noise_multiplier:.3f}"
            )
        else:
            self._say(
                f"sample rate changed from {st.sample_rate:.4g} to {actual:.4g} "
                "(training set changed): accounted as such; the budget may end early"
            )
        st.sample_rate = actual
        self.save()

    def _note_sampler(self, loader: DataLoader) -> None:
        if not isinstance(loader.sampler, RandomSampler | SequentialSampler):
            self._say(
                f"the training loader's {type(loader.sampler).__name__} is replaced by uniform "
                "Poisson sampling under DP-SGD (class_weighting=sampler has no effect)"
            )

    def _working_mode(self, model: nn.Module, loader: DataLoader) -> str:
        """With ``auto``, the fastest mode by a timed probe (fedmsk.privacy.modes; cached on the
        node); otherwise, or if no mode passes it, the requested/auto mode if one pass
        succeeds, else the first fallback that does. Kept for the run once chosen."""
        auto = (self.cfg.grad_sample_mode or "auto").strip().lower() == "auto"
        if auto and self.state.grad_sample_mode in dp_modes.PROBED_MODES:
            return self.state.grad_sample_mode  # chosen in an earlier round of this run
        if auto:
            cache = None if self.ledger is None else self.ledger.path.with_name(dp_modes.CACHE_FILE)
            fastest = dp_modes.fastest_grad_sample_mode(model, loader, cache)
            if fastest is not None:
                self.state.grad_sample_mode = fastest
                return fastest
        requested = choose_grad_sample_mode(model, self.cfg.grad_sample_mode)
        candidates = [requested] + [m for m in _FIT_FALLBACKS if m != requested]
        if requested == "ghost":
            self._say(
                "privacy.grad_sample_mode=ghost needs Opacus' two-pass loss, which "
                "fedmsk.training.fit does not use: falling back"
            )
            candidates = list(_FIT_FALLBACKS)
        if self.state.grad_sample_mode in candidates[:1]:
            return self.state.grad_sample_mode  # probed in an earlier round of this run
        for mode in candidates:
            problem = dp_modes.mode_works(model, mode, loader)
            if problem is None:
                if mode != candidates[0]:
                    self._say(
                        f"per-sample gradient mode {mode!r} used instead of {candidates[0]!r}"
                    )
                self.state.grad_sample_mode = mode
                return mode
            self._say(f"per-sample gradient mode {mode!r} fails for {model_name(model)}: {problem}")
        raise DPCompatibilityError(
            f"model {model_name(model)!r}: no Opacus per-sample gradient mode works "
            f"(tried {', '.join(candidates)}); choose another model or set privacy.enabled=false"
        )

    def _private_generator(self, device: torch.device | str) -> torch.Generator:
        if self._seeds is None:
            return secret_generator(device)
        return torch.Generator(device=device).manual_seed(self._seeds.getrandbits(63))

    def _say(self, message: str) -> None:
        self.messages.append(message)
        log.warning("DP-SGD: %s", message)
