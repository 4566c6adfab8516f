"""fedmsk.privacy.randomness: DP-SGD generators with a whole secret state, not 32 seed bits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedmsk.privacy.randomness import MT_WORDS, secret_generator


def _fixed_bytes(flip_word: int | None = None) -> Callable[[int], bytes]:
    """A stand-in for the OS CSPRNG: fixed bytes, optionally with one twister word changed."""

    def token_bytes(n: int) -> bytes:
        data = bytearray((bytes(range(7, 256)) * (n // 249 + 1))[:n])
        if flip_word is not None:
            data[4 * flip_word + 2] ^= 0x10
        return bytes(data)

    return token_bytes


def test_torch_seeds_keep_only_32_bits_which_is_why_seeds_are_not_used() -> None:
    # the weakness this module exists for: if this ever fails, torch seeds more than 32 bits
    same = [torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in (5, 5 + 2**40)]
    assert torch.equal(*same)


def test_the_generator_state_comes_from_the_given_bytes_word_by_word() -> None:
    draws = lambda source: torch.randn(2000, generator=secret_generator("cpu", source))  # noqa: E731
    assert torch.equal(draws(_fixed_bytes()), draws(_fixed_bytes()))
    # a change in a middle word or in the last word changes the stream: the whole state counts
    for word in (1, MT_WORDS // 2, MT_WORDS - 1):
        assert not torch.equal(draws(_fixed_bytes()), draws(_fixed_bytes(word))), word


def test_secret_generators_differ_and_are_not_any_small_seed() -> None:
    first, second = secret_generator(), secret_generator()
    a, b = torch.randn(64, generator=first), torch.randn(64, generator=second)
    assert not torch.equal(a, b)
    # the state is not what manual_seed writes for the seed the generator reports
    reseeded = torch.Generator().manual_seed(first.initial_seed())
    assert not torch.equal(
        torch.randn(64, generator=secret_generator()), torch.randn(64, generator=reseeded)
    )
    assert 0.5 < float(torch.cat([a, b]).std()) < 1.5  # still a standard normal source


def test_secure_mode_without_its_dependency_is_refused_with_what_to_install(
    tmp_path: Path,
) -> None:
    import importlib.util

    from fedmsk.config import PrivacyConfig
    from fedmsk.privacy import DPSession

    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here: secure mode is available")
    with pytest.raises(ValueError, match="torchcsprng") as err:
        DPSession.for_site(
            PrivacyConfig(enabled=True, secure_mode=True),
            state_path=tmp_path / "p.json",
            num_examples=16,
            batch_size=4,
            steps_per_round=4,
            planned_rounds=3,
        )
    assert "privacy.secure_mode" in str(err.value) and not (tmp_path / "p.json").exists()
