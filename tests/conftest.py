"""Shared test set-up: small thread counts, and Flower's task identity for hand-made messages."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """One thread per test process, for training too: ``train.num_threads=auto`` reads
    OMP_NUM_THREADS, and two pytest workers share the CI machine's two cores."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def flower_task_identity() -> None:
    """Messages built outside a running app need the identity a SuperLink would give them."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
