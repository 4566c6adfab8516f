"""Shared test set-up: small thread counts, and Flower's task identity for hand-made messages."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def flower_task_identity() -> None:
    """Messages built outside a running app need the identity a SuperLink would give them."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
