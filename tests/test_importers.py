"""Importers on tiny generated trees: folder layout and MURA layout, copy and reference modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmsk.cli import main
from fedmsk.data.importers import ImporterError, import_folder, import_mura
from fedmsk.data.manifest import read_manifest


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((8, 8), value, dtype=np.uint8)
    pixels[0, 0] = value // 2
    Image.fromarray(pixels).save(path)
    return path


def _folder_tree(root: Path) -> None:
    _png(root / "normal" / "P01_a.png", 10)
    _png(root / "normal" / "P01_b.png", 20)
    _png(root / "normal" / "deeper" / "P02_a.png", 30)
    _png(root / "fracture" / "P03_a.png", 40)
    (root / "fracture" / "notes.txt").write_text("not an image")
    _png(root / "fracture" / ".hidden.png", 50)


def test_folder_default_patient_is_file_stem_and_files_are_copied(tmp_path: Path) -> None:
    src, site = tmp_path / "export", tmp_path / "site"
    _folder_tree(src)
    result = import_folder(src, site)
    rows = read_manifest(site)
    assert rows == result.rows
    assert sorted((r.image, r.label, r.patient_id) for r in rows) == [
        ("images/fracture/P03_a.png", "fracture", "P03_a"),
        ("images/normal/P01_a.png", "normal", "P01_a"),
        ("images/normal/P01_b.png", "normal", "P01_b"),
        ("images/normal/deeper/P02_a.png", "normal", "P02_a"),
    ]
    assert result.copied == 4
    for row in rows:
        assert (site / row.image).read_bytes() == (src / row.image[len("images/") :]).read_bytes()


def test_folder_patient_pattern_groups_a_patients_files(tmp_path: Path) -> None:
    src, site = tmp_path / "export", tmp_path / "site"
    _folder_tree(src)
    _png(src / "normal" / "unmatched.png")
    result = import_folder(src, site, patient_pattern=r"(?P<patient>P\d+)_")
    ids = {Path(r.image).name: r.patient_id for r in result.rows}
    assert ids == {"P01_a.png": "P01", "P01_b.png": "P01", "P02_a.png": "P02", "P03_a.png": "P03"}
    assert [name for name, _ in result.skipped] == ["normal/unmatched.png"]


def test_folder_patient_csv(tmp_path: Path) -> None:
    src, site = tmp_path / "export", tmp_path / "site"
    _folder_tree(src)
    table = tmp_path / "patients.csv"
    table.write_text(
        "file,patient_id\nnormal/P01_a.png,X1\nP01_b.png,X1\nnormal/deeper/P02_a.png,X2\n"
    )
    result = import_folder(src, site, patient_csv=table, mode="reference")
    assert {Path(r.image).name: r.patient_id for r in result.rows} == {
        "P01_a.png": "X1",
        "P01_b.png": "X1",
        "P02_a.png": "X2",
    }
    assert result.skipped == [("fracture/P03_a.png", "not listed in patients.csv")]
    # reference mode: nothing copied, relative paths that climb out of the site folder
    assert result.copied == 0 and not (site / "images").exists()
    for row in result.rows:
        assert row.image.startswith("../export/")
        assert (site / row.image).is_file()


def test_folder_inside_site_is_referenced_in_place(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _folder_tree(site / "raw")
    result = import_folder(site / "raw", site)
    assert result.copied == 0
    assert "raw/normal/P01_a.png" in {r.image for r in result.rows}


def test_existing_manifest_needs_force_and_errors_name_the_path(tmp_path: Path) -> None:
    src, site = tmp_path / "export", tmp_path / "site"
    _folder_tree(src)
    import_folder(src, site)
    with pytest.raises(ImporterError, match="manifest.csv: a manifest exists already"):
        import_folder(src, site)
    import_folder(src, site, overwrite=True)
    with pytest.raises(ImporterError, match="nowhere: source folder not found"):
        import_folder(tmp_path / "nowhere", tmp_path / "s2")
    (tmp_path / "empty" / "label").mkdir(parents=True)
    with pytest.raises(ImporterError, match="no images found"):
        import_folder(tmp_path / "empty", tmp_path / "s3")


def _mura_tree(root: Path) -> None:
    for split in ("train", "valid"):
        base = root / "MURA-v1.1" / split
        _png(base / "XR_WRIST" / "patient00001" / "study1_positive" / "image1.png", 11)
        _png(base / "XR_WRIST" / "patient00001" / "study1_positive" / "image2.png", 12)
        _png(base / "XR_WRIST" / "patient00001" / "study2_negative" / "image1.png", 13)
        _png(base / "XR_ELBOW" / "patient00002" / "study1_negative" / "image1.png", 14)
        _png(base / "XR_ELBOW" / "patient00002" / "study1_negative" / "._image1.png", 15)
        _png(base / "XR_ELBOW" / "patient00002" / "weird" / "image1.png", 16)


def test_mura_layout(tmp_path: Path) -> None:
    src, site = tmp_path / "mura", tmp_path / "site"
    _mura_tree(src)
    result = import_mura(src, site)
    rows = read_manifest(site)
    assert len(rows) == 8
    by_name = {r.image: r for r in rows}
    row = by_name["images/MURA-v1.1/train/XR_WRIST/patient00001/study1_positive/image2.png"]
    assert (row.label, row.patient_id, row.view) == ("positive", "00001", "wrist")
    assert row.study_id == "wrist/patient00001/study1"
    other = by_name["images/MURA-v1.1/valid/XR_ELBOW/patient00002/study1_negative/image1.png"]
    assert (other.label, other.view, other.study_id) == (
        "negative",
        "elbow",
        "elbow/patient00002/study1",
    )
    assert {r.label for r in rows} == {"positive", "negative"}
    assert sorted(name for name, _ in result.skipped) == [
        "MURA-v1.1/train/XR_ELBOW/patient00002/weird/image1.png",
        "MURA-v1.1/valid/XR_ELBOW/patient00002/weird/image1.png",
    ]
    assert all((site / r.image).is_file() for r in rows)


def test_cli_imports_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "mura"
    _mura_tree(src)
    assert main(["data", "import-mura", str(src), str(tmp_path / "site")]) == 0
    out = capsys.readouterr().out
    assert "8 images" in out and "2 file(s) not imported" in out
    assert main(["data", "import-mura", str(src), str(tmp_path / "site")]) == 2
    assert "--force" in capsys.readouterr().err
    folder = tmp_path / "export"
    _folder_tree(folder)
    code = main(
        [
            "data",
            "import-folder",
            str(folder),
            str(tmp_path / "s2"),
            "--reference",
            "--patient-pattern",
            r"(P\d+)_",
        ]
    )
    assert code == 0
    assert {r.patient_id for r in read_manifest(tmp_path / "s2")} == {"P01", "P02", "P03"}
    assert (
        main(["data", "import-folder", str(folder), str(tmp_path / "s3"), "--patient-pattern", "("])
        == 2
    )
