"""check_site and `fedmsk data check`: each problem kind, counts, no patient ids, exit code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmsk.cli import main
from fedmsk.data.check import check_site
from fedmsk.data.dicom_write import DicomPHI, write_dicom
from fedmsk.data.manifest import ManifestRow, write_manifest

SECRET = "ZQX-PATIENT-7781"  # distinctive ids: must never be printed
SECRET_B = "ZQX-PATIENT-9902"
SECRET_MURA = "00731"


def _png(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path.name


def _site(tmp_path: Path) -> Path:
    """A site with one of each problem, plus enough good images."""
    site = tmp_path / "site"
    img = site / "images"
    rows = []
    for i in range(4):
        _png(img / f"n{i}.png", i)
        rows.append(ManifestRow(f"images/n{i}.png", "normal", SECRET, view="wrist"))
    for i in range(3):
        _png(img / f"f{i}.png", 10 + i)
        rows.append(ManifestRow(f"images/f{i}.png", "fracture", f"{SECRET_B}{i}", view="elbow"))
    dicom = img / "d0.dcm"
    write_dicom(
        dicom,
        np.arange(256, dtype=np.uint16).reshape(16, 16) * 8,
        phi=DicomPHI(patient_name="Doe^Jane", patient_id=SECRET),
    )
    rows.append(ManifestRow("images/d0.dcm", "fracture", SECRET, view="wrist"))
    rows.append(ManifestRow("images/gone.png", "normal", SECRET))  # missing file
    (img / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    rows.append(ManifestRow("images/broken.png", "normal", SECRET))  # unreadable
    _png(img / "odd.png", 99)
    rows.append(ManifestRow("images/odd.png", "dislocation", SECRET))  # unknown label
    (img / "copy.png").write_bytes((img / "n0.png").read_bytes())
    rows.append(ManifestRow("images/copy.png", "normal", "someone"))  # duplicate content
    _png(img / "s1.png", 21)
    _png(img / "s2.png", 22)
    rows.append(ManifestRow("images/s1.png", "normal", f"{SECRET}-split", split="train"))
    rows.append(ManifestRow("images/s2.png", "normal", f"{SECRET}-split", split="test"))
    _png(site / "XR_WRIST" / f"patient{SECRET_MURA}" / "image1.png", 31)
    rows.append(
        ManifestRow(f"XR_WRIST/patient{SECRET_MURA}/image1.png", "normal", SECRET_MURA, "nope")
    )
    write_manifest(site, rows)
    return site


def test_each_problem_kind_is_found_and_bad_rows_are_left_out(tmp_path: Path) -> None:
    report = check_site(_site(tmp_path), ["normal", "fracture"], 2)
    kinds = {p.kind: p for p in report.problems}
    assert kinds["missing_file"].images == ("images/gone.png",)
    assert kinds["unreadable_image"].images == ("images/broken.png",)
    assert kinds["unknown_label"].images == ("images/odd.png",)
    assert kinds["duplicate_content"].images == ("images/copy.png", "images/n0.png")
    assert set(kinds["patient_in_two_splits"].images) == {"images/s1.png", "images/s2.png"}
    assert kinds["missing_file"].lines == (10,)
    assert "too_few_examples" not in kinds
    usable = {r.image for r in report.usable}
    assert usable == {f"images/n{i}.png" for i in range(4)} | {
        f"images/f{i}.png" for i in range(3)
    } | {"images/d0.dcm", f"XR_WRIST/patient{SECRET_MURA}/image1.png"}
    assert report.counts == {
        "normal": {"wrist": 4, "nope": 1},
        "fracture": {"elbow": 3, "wrist": 1},
    }
    assert report.ok


def test_views_and_too_few_examples(tmp_path: Path) -> None:
    report = check_site(_site(tmp_path), ["normal", "fracture"], 5, views=["wrist"])
    kinds = [p.kind for p in report.problems]
    # elbow (3 fracture rows) and "nope" are other views; fracture keeps 1 (< 5), normal 4
    assert kinds.count("other_view") == 4
    assert kinds.count("too_few_examples") == 2
    assert report.counts["fracture"] == {"wrist": 1}


def test_render_names_files_but_no_patient_identifier(tmp_path: Path) -> None:
    text = check_site(_site(tmp_path), ["normal", "fracture"], 2).render()
    for secret in (SECRET, SECRET_B, SECRET_MURA, "Doe^Jane"):
        assert secret not in text
    for name in ("gone.png", "broken.png", "odd.png", "copy.png", "s1.png", "s2.png"):
        assert name in text
    assert "patient<patient>/image1.png" not in text  # valid row: not listed at all
    assert "missing_file" in text and "duplicate_content" in text
    header = next(line for line in text.splitlines() if line.strip().startswith("class"))
    assert "elbow" in header and "wrist" in header


def test_masking_keeps_mura_style_paths_findable(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_manifest(
        site, [ManifestRow(f"XR_HAND/patient{SECRET_MURA}/image9.png", "normal", SECRET_MURA)]
    )
    text = check_site(site, ["normal"], 0).render()
    assert SECRET_MURA not in text
    assert "manifest line 2: XR_HAND/patient<patient>/image9.png" in text
    assert "NOTHING USABLE REMAINS" in text


def test_cli_exit_status_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _site(tmp_path)
    assert main(["data", "check", str(site), "--classes", "normal,fracture"]) == 0
    captured = capsys.readouterr()
    for secret in (SECRET, SECRET_B, SECRET_MURA):
        assert secret not in captured.out + captured.err
    assert "broken.png" in captured.out
    # task config: xray_fracture has the classes normal, fracture
    assert main(["data", "check", str(site), "--task", "xray_fracture"]) == 0
    assert "unknown_label" in capsys.readouterr().out
    # nothing usable: non-zero
    assert main(["data", "check", str(site), "--classes", "other"]) == 1
    assert "NOTHING USABLE" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main(["data", "check", str(site), "--task", "no_such_task"]) == 2


def test_classes_default_to_federation_json_then_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = _site(tmp_path)
    labels = check_site(site, None, 1)
    assert "dislocation" in labels.classes
    assert not [p for p in labels.problems if p.kind == "unknown_label"]
    assert main(["data", "check", str(site)]) == 0
    assert "unknown_label" not in capsys.readouterr().out
    (tmp_path / "federation.json").write_text('{"classes": ["normal", "fracture"]}')
    assert main(["data", "check", str(site)]) == 0
    assert "'dislocation' is not a class" in capsys.readouterr().out
