"""The app bundle (FAB) Flower ships to every node holds what nodes run, nothing more."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parent.parent


def test_fab_ships_the_apps_and_configs_but_no_tests_docs_or_benchmarks() -> None:
    bundle = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(bundle)).namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert tops <= {"fedmsk", "server", "client", "configs", "pyproject.toml", ".info"}
    for needed in ("server/app.py", "client/app.py", "client/node.py", "fedmsk/protocol.py"):
        assert needed in names
    assert "configs/config.yaml" in names
    assert len(bundle) < 1_500_000
