"""Random generators for DP-SGD whose whole state is secret.

The server knows a run's seed, so a site's Poisson sampling and noise must come from generators
nobody else can reproduce. A CPU ``torch.Generator`` is a Mersenne Twister that ``manual_seed``
fills from 32 bits of its argument (seeds 5 and 5 + 2**40 draw the same numbers): whoever can try
2**32 seeds against a released update could rebuild a site's noise and subtract it. Opacus's
secure mode needs ``torchcsprng``, which cannot be installed here. Instead the twister's 624-word
state is filled with bytes from the operating system's CSPRNG (``secrets``): 19,968 secret bits.
A CUDA generator (Philox) takes a full 64-bit seed, drawn the same way.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import numpy as np
import torch

MT_WORDS = 624
# torch's CPU generator state (CPUGeneratorImplState): the_initial_seed (uint64), left (int32),
# seeded (int32), next (uint64), then the twister's 624 words, each stored in a uint64 slot
_WORDS_OFFSET = 24
_SLOT_BYTES = 8


class SecretStateError(RuntimeError):
    """The generator's state layout is not the one this module writes (another torch build)."""


def secret_generator(
    device: torch.device | str = "cpu", token_bytes: Callable[[int], bytes] = secrets.token_bytes
) -> torch.Generator:
    """A generator on ``device`` whose state comes from ``token_bytes`` (the OS CSPRNG)."""
    device = torch.device(device)
    if device.type != "cpu":
        generator = torch.Generator(device=device)
        generator.manual_seed(int.from_bytes(token_bytes(8), "little") >> 1)
        return generator
    return _secret_cpu_generator(token_bytes)


def _secret_cpu_generator(token_bytes: Callable[[int], bytes]) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(0)  # a valid state whose position fields we keep (next draw twists)
    state = generator.get_state().clone()
    end = _WORDS_OFFSET + MT_WORDS * _SLOT_BYTES
    if state.numel() < end or int.from_bytes(state[:8].numpy().tobytes(), "little") != 0:
        raise SecretStateError(
            f"torch {torch.__version__}: CPU generator state of {state.numel()} bytes is not "
            "the layout fedmsk.privacy.randomness writes; DP-SGD cannot seed its generators "
            "secretly"
        )
    words = np.frombuffer(token_bytes(4 * MT_WORDS), dtype="<u4")
    state.numpy()[_WORDS_OFFSET:end].view("<u8")[:] = words
    generator.set_state(state)
    if not torch.equal(generator.get_state(), state):
        raise SecretStateError(
            f"torch {torch.__version__}: the CPU generator did not keep the secret state written "
            "to it; DP-SGD cannot seed its generators secretly"
        )
    return generator


def require_secure_mode_dependency() -> None:
    """``privacy.secure_mode=true`` hands sampling and noise to Opacus's secure mode, which
    draws them from ``torchcsprng``; a node without that package is told so at once."""
    import importlib.util

    if importlib.util.find_spec("torchcsprng") is None:
        raise ValueError(
            "privacy.secure_mode=true needs the torchcsprng package, which is not installed on "
            "this node (install a build that matches its torch). Without secure mode, DP-SGD's "
            "sampling and noise generators get their whole state from the operating system's "
            "CSPRNG (fedmsk/privacy/randomness.py)"
        )
