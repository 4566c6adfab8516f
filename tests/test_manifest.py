"""Manifest round trip and the errors a hand-edited manifest can cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmsk.data.manifest import ManifestError, ManifestRow, read_manifest, write_manifest


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    rows = [
        ManifestRow("images/a.png", "fracture", "P1", "wrist", "S1", "L", "train"),
        ManifestRow("images/b c,d.png", "normal", "P2"),
        ManifestRow('images/quote"e.png', "normal", "P3", split="test"),
    ]
    path = write_manifest(tmp_path, rows)
    assert path == tmp_path / "manifest.csv"
    assert read_manifest(tmp_path) == rows


def test_missing_manifest_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="manifest.csv: manifest not found"):
        read_manifest(tmp_path)


def test_missing_required_column_is_named(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("image,label\na.png,normal\n")
    with pytest.raises(ManifestError, match="patient_id"):
        read_manifest(tmp_path)


def test_empty_image_value_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("image,label,patient_id\na.png,normal,P1\n ,normal,P2\n")
    with pytest.raises(ManifestError, match=r"manifest.csv:3: empty 'image'"):
        read_manifest(tmp_path)


def test_optional_columns_may_be_absent_and_values_are_stripped(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("label,image,patient_id\n fracture , a.png ,P9\n")
    assert read_manifest(tmp_path) == [ManifestRow("a.png", "fracture", "P9")]
