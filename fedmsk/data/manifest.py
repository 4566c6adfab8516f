"""The site manifest: one CSV per site that lists its images and what is known of them.

Paths in a manifest are relative to the site directory, so a site folder can be moved or
mounted elsewhere. The manifest holds patient identifiers; it never leaves the node.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path

MANIFEST_NAME = "manifest.csv"
REQUIRED_COLUMNS = ("image", "label", "patient_id")
OPTIONAL_COLUMNS = ("view", "study_id", "laterality", "split")
ALL_COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class ManifestRow:
    image: str
    label: str
    patient_id: str
    view: str = ""
    study_id: str = ""
    laterality: str = ""
    split: str = ""


def manifest_path(site_dir: Path) -> Path:
    return Path(site_dir) / MANIFEST_NAME


def read_manifest(site_dir: Path) -> list[ManifestRow]:
    """Read ``SITE_DIR/manifest.csv``; raises :class:`ManifestError` naming the file."""
    path = manifest_path(site_dir)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found (run an importer or `fedmsk data synth`)")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing required column(s) {', '.join(missing)}")
        rows = []
        for line_no, record in enumerate(reader, start=2):
            values = {c: (record.get(c) or "").strip() for c in ALL_COLUMNS}
            if not values["image"]:
                raise ManifestError(f"{path}:{line_no}: empty 'image' value")
            rows.append(ManifestRow(**values))
    return rows


def write_manifest(site_dir: Path, rows: list[ManifestRow]) -> Path:
    """Write rows to ``SITE_DIR/manifest.csv`` with the standard column order."""
    path = manifest_path(site_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [f.name for f in fields(ManifestRow)]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({n: getattr(row, n) for n in names})
    return path
