"""report.html as a reader's browser shows it: headless Chromium from Debian's package.

Two reports are opened: one the size of the demo's (13 centers, 24 rounds, Grad-CAM figure) and
a study report (study table and figure, reader comparison). For each: no console error or
uncaught exception, every image loaded (naturalWidth > 0), no link to a missing file. The
screenshots are kept in test-output/browser/ (or $FEDMSK_TEST_OUTPUT) for a person to look at.
`make test` installs the package when it is missing and the machine allows it (root + apt).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import matplotlib
import pytest
from browser import check_page, find_browser
from test_report import binary_summary, reader_comparison

from fedmsk.report import build_report

matplotlib.use("Agg")

BROWSER = find_browser()
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="no chromium on this machine: `make test` installs Debian's chromium package when "
    "run as root with apt; otherwise install it to run the browser test",
)
ROOT = Path(__file__).resolve().parent.parent


def _output_dir() -> Path:
    return Path(os.environ.get("FEDMSK_TEST_OUTPUT", ROOT / "test-output")) / "browser"


def _figure(path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(4, 3))
    axes.plot([0, 0.2, 1], [0, 0.8, 1], color="tab:blue", label="model")
    axes.legend()
    figure.savefig(path)
    plt.close(figure)


def _demo_sized_run(run_dir: Path) -> None:
    """13 centers (12 training + 1 held-out) and 24 rounds, as `make demo` writes them."""
    sites = {
        f"site{i:02d}": {
            "role": "train",
            "split": "val",
            "n": 20,
            "summary": binary_summary(10 + i, 20, 2.0, 0.5),
        }
        for i in range(12)
    }
    sites["site12"] = {
        "role": "heldout",
        "split": "test",
        "n": 214,
        "summary": binary_summary(99, 214, 1.5, 0.5),
    }
    results = {
        "run": {
            "mode": "federated",
            "strategy": "cyclic",
            "model": "resnet18",
            "task": "xray_fracture",
            "classes": ["normal", "fracture"],
            "rounds": 24,
            "config_hash": "ec471807bc74ca59",
        },
        "threshold": {"value": 0.5, "source": "youden on federated validation histograms"},
        "sites": sites,
        "failures": [{"round": 3, "site": "site04", "phase": "train", "error": "Timeout"}],
        "privacy": {},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    rows = []
    for r in range(1, 25):
        rows += [
            {"round": r, "phase": "train", "site": a, "train-loss": 0.7 / r**0.3} for a in sites
        ]
        rows.append({"round": r, "phase": "train", "site": None, "train-loss": 0.7 / r**0.3})
        if r % 4 == 0:
            rows.append({"round": r, "phase": "val", "site": None, "auc": 0.6 + r / 100, "n": 215})
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in rows) + "\n")
    _figure(run_dir / "figures" / "cam_site12.png")
    pointing = {"site12": {"n": 52, "hits": 27, "chance": 0.054, "p_value": 1e-20}}
    (run_dir / "pointing_game.json").write_text(json.dumps(pointing))


def _study_run(run_dir: Path) -> None:
    run_dir.mkdir(parents=True)
    results = {
        "run": {"mode": "federated", "task": "gout_mtp1_us", "classes": ["normal", "gout"]},
        "threshold": {"value": 0.5, "source": "youden"},
        "sites": {
            "site00": {"role": "train", "split": "val", "summary": binary_summary(1, 60, 2.0, 0.5)},
            "site03": {
                "role": "heldout",
                "split": "test",
                "summary": binary_summary(2, 80, 1.8, 0.5),
            },
        },
        "readers": reader_comparison(),
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "study_table.md").write_text(
        "# Single vs multiple model\n\nPaired DeLong on the test set.\n\n"
        "| model | AUC | Z | P |\n|---|---|---|---|\n| single | 0.917 | -0.50 | 0.62 |\n"
    )
    _figure(run_dir / "figures" / "study_roc.png")


def _assert_page_is_whole(page: Path, name: str) -> None:
    assert BROWSER is not None
    shot = _output_dir() / f"{name}.png"
    seen = check_page(BROWSER, page, shot)
    assert seen.console_errors == [], seen.console_errors
    assert seen.title.startswith("fedmsk study report")
    assert len(seen.images) >= 3, "the report should show its figures"
    broken = [i for i in seen.images if not i["complete"] or i["width"] <= 0]
    assert not broken, broken
    for link in seen.links:
        parsed = urlparse(link)
        if parsed.scheme == "file":
            assert Path(unquote(parsed.path)).exists(), f"link to a missing file: {link}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_demo_sized_report_opens_whole_in_a_browser(tmp_path: Path) -> None:
    run_dir = tmp_path / "demo-run"
    _demo_sized_run(run_dir)
    page = build_report(run_dir).html
    _assert_page_is_whole(page, "demo-report")
    assert "the map&#x27;s peak falls on the finding in 27 of 52" in page.read_text()


def test_study_report_opens_whole_in_a_browser(tmp_path: Path) -> None:
    run_dir = tmp_path / "study-run"
    _study_run(run_dir)
    _assert_page_is_whole(build_report(run_dir).html, "study-report")


def test_a_broken_image_is_caught(tmp_path: Path) -> None:
    """The check itself can fail: a page with a missing image and a script error."""
    assert BROWSER is not None
    page = tmp_path / "broken.html"
    page.write_text(
        "<html><head><title>fedmsk study report: broken</title></head><body>"
        '<img src="missing.png" alt="gone"><script>console.error("boom")</script></body></html>'
    )
    seen = check_page(BROWSER, page, tmp_path / "broken.png")
    assert any("boom" in e for e in seen.console_errors)
    assert [i["width"] for i in seen.images] == [0]
