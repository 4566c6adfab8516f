"""``fedmsk launch``: what it refuses before starting anything. The launch itself, a study
that fails and the exit code and cause it gives, runs in the real deployment
(tests/test_deployment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmsk.cli import main
from fedmsk.commands.launch import run_directory


def _run_config(path: Path, overrides: list[str]) -> Path:
    path.write_text(f"fedmsk-overrides = '{json.dumps(overrides)}'\n")
    return path


def test_the_run_directory_comes_from_the_run_configs_overrides(tmp_path: Path) -> None:
    run_dir = tmp_path / "study"
    path = _run_config(tmp_path / "run.toml", [f"run_dir={run_dir}", "federation.sites=[a,b]"])
    assert run_directory(path) == run_dir


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("fedmsk-overrides = '[\"run_dir=relative/dir\"]'\n", "must be an absolute path"),
        ("other = 1\n", "has no 'fedmsk-overrides' key"),
        ("fedmsk-overrides = [unclosed\n", "cannot be read as TOML"),
    ],
)
def test_a_run_config_it_cannot_use_is_refused_with_the_file_and_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert main(["launch", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"fedmsk launch: {path}") and problem in error
