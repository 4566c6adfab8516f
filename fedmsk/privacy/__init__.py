"""Differential privacy at a hospital node: DP-SGD with Opacus under a budget the site owns.

One job per module, because a privacy officer reads them one at a time:

- :mod:`~fedmsk.privacy.session`: one site's DP-SGD for one run (``DPSession``): the noise for
  the run's planned steps, its accountant state on the node, Opacus attached and detached;
- :mod:`~fedmsk.privacy.ledger`: the site's lifetime ledger over every run on its data set and
  the cap the hospital sets in ``privacy-policy.toml``;
- :mod:`~fedmsk.privacy.accounting`: epsilon of a DP-SGD history, the noise for a target;
- :mod:`~fedmsk.privacy.modes`: the per-sample gradient mode, chosen by a timed probe;
- :mod:`~fedmsk.privacy.randomness`: sampling and noise generators with a whole secret state;
- :mod:`~fedmsk.privacy.compat`: making a timm model trainable by Opacus (GroupNorm for
  BatchNorm, no in-place activations).
"""

from fedmsk.privacy.accounting import (
    BudgetExhaustedError,
    default_delta,
    derive_noise_multiplier,
    epsilon_for,
)
from fedmsk.privacy.compat import DPCompatibilityError, make_dp_compatible
from fedmsk.privacy.modes import GRAD_SAMPLE_MODES, choose_grad_sample_mode
from fedmsk.privacy.session import ACCOUNTANTS, DPSession, EmptyBatchSafe, PrivacyState

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "BudgetExhaustedError",
    "DPCompatibilityError",
    "DPSession",
    "EmptyBatchSafe",
    "PrivacyState",
    "choose_grad_sample_mode",
    "default_delta",
    "derive_noise_multiplier",
    "epsilon_for",
    "make_dp_compatible",
]
