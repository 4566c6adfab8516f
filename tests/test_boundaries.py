"""The design's boundary: the core library ``fedmsk`` never imports Flower."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "fedmsk"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_does_not_import_flower(path: Path) -> None:
    flower = sorted(n for n in _imported_modules(path) if n == "flwr" or n.startswith("flwr."))
    assert not flower, (
        f"{path.relative_to(ROOT)} imports {flower}: keep Flower in server/ and client/"
    )


def test_importing_every_core_module_loads_no_flower() -> None:
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in CORE.rglob("*.py")
        if p.name != "__init__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"flwr modules loaded by fedmsk: {result.stdout.strip()}"


def test_the_checker_sees_a_flower_import(tmp_path: Path) -> None:
    sample = tmp_path / "bad.py"
    sample.write_text("from flwr.app import Message\nimport numpy\n")
    assert "flwr.app" in _imported_modules(sample)
