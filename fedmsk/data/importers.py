"""Write a site manifest from common on-disk layouts.

Two layouts are understood:

* **folder**: ``SRC/<label>/<files>`` (files may sit in sub-folders of the label folder).
  Without more information each file is its own patient (patient id = file stem), which is the
  only safe default that never merges two patients. Pass ``patient_pattern`` (a regular
  expression searched in the path below the label folder; the named group ``patient``, or else
  group 1, is the id, e.g. ``r"^(P\\d+)_"``) or ``patient_csv`` (a CSV with columns ``file``
  and ``patient_id``, ``file`` being the path relative to SRC, or just the file name) when
  several files belong to one patient: otherwise a patient's images can end up in different
  splits.
* **MURA**: ``XR_<BODYPART>/patient<id>/study<n>_<positive|negative>/image<k>.png``, found at any
  depth below SRC (so the ``train/`` and ``valid/`` folders of the release both work). View is
  the body part in lower case (``wrist``), the label is ``positive``/``negative``, the study id
  is ``<bodypart>/patient<id>/study<n>`` (study numbers restart per patient).

Where the images go: manifest paths are relative to SITE_DIR. When SRC is inside SITE_DIR the
files are referenced where they are. Otherwise they are **copied** to ``SITE_DIR/images/``
(``mode="copy"``, the default), so that the site folder is self-contained and can be moved or
mounted elsewhere; ``mode="reference"`` instead writes relative paths that climb out of
SITE_DIR (``../..``), which saves the disk space but breaks when either folder moves. No
symbolic links are made (they do not survive copying to another volume or Windows shares).

Hidden files (``.*``, including macOS ``._`` shadow files that ship in the MURA archive) and
files that are not images by suffix are ignored; files that do not fit the layout are listed
in :attr:`ImportResult.skipped`.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from fedmsk.data.manifest import ManifestRow, manifest_path, write_manifest

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".dic", ""})
MODES = ("copy", "reference")
IMAGES_DIR = "images"
_MURA_BODYPART = re.compile(r"^XR_([A-Za-z]+)$")
_MURA_PATIENT = re.compile(r"^patient(\w+)$")
_MURA_STUDY = re.compile(r"^study(\d+)_(positive|negative)$")


class ImporterError(ValueError):
    """An import that cannot proceed; the message names the path or setting."""


@dataclass
class ImportResult:
    """What an importer wrote: the rows, the manifest file, and files it did not use."""

    rows: list[ManifestRow]
    manifest: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)
    copied: int = 0


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _image_files(root: Path, exclude: Path) -> list[Path]:
    """Image-like files below ``root`` in sorted order; hidden files, manifests and anything
    inside ``exclude`` (the site folder, when it lies within the source) left out."""
    found = []
    exclude = exclude.resolve()
    inside_root = root.resolve() in exclude.parents
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if _is_hidden(relative) or not path.is_file():
            continue
        if inside_root and exclude in path.resolve().parents:
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.name != "manifest.csv":
            found.append(path)
    return found


class _Placer:
    """Turns a source file into a manifest path, copying it when SRC is outside SITE_DIR."""

    def __init__(self, src: Path, site_dir: Path, mode: str) -> None:
        if mode not in MODES:
            raise ImporterError(f"mode={mode!r}: use one of {', '.join(MODES)}")
        self.src = src.resolve()
        self.site_dir = site_dir.resolve()
        self.inside = self.src == self.site_dir or self.site_dir in self.src.parents
        self.mode = mode
        self.copied = 0

    def place(self, path: Path) -> str:
        path = path.resolve()
        if self.inside:
            return path.relative_to(self.site_dir).as_posix()
        if self.mode == "reference":
            return Path(os.path.relpath(path, self.site_dir)).as_posix()
        relative = Path(IMAGES_DIR) / path.relative_to(self.src)
        target = self.site_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (target.is_file() and target.stat().st_size == path.stat().st_size):
            shutil.copy2(path, target)
            self.copied += 1
        return relative.as_posix()


def _prepare(src: Path, site_dir: Path, overwrite: bool) -> tuple[Path, Path]:
    src, site_dir = Path(src), Path(site_dir)
    if not src.is_dir():
        raise ImporterError(f"{src}: source folder not found")
    if manifest_path(site_dir).exists() and not overwrite:
        raise ImporterError(
            f"{manifest_path(site_dir)}: a manifest exists already; pass --force to replace it"
        )
    site_dir.mkdir(parents=True, exist_ok=True)
    return src, site_dir


def _patient_ids_from_csv(csv_path: Path) -> dict[str, str]:
    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        if "file" not in header or "patient_id" not in header:
            raise ImporterError(f"{csv_path}: needs the columns 'file' and 'patient_id'")
        return {
            rec["file"].strip(): rec["patient_id"].strip()
            for rec in reader
            if rec.get("file") and rec.get("patient_id")
        }


def _pattern_patient(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    if match is None:
        return None
    if "patient" in pattern.groupindex:
        return match.group("patient")
    return match.group(1) if pattern.groups else match.group(0)


def import_folder(
    src: Path,
    site_dir: Path,
    *,
    patient_pattern: str | None = None,
    patient_csv: Path | None = None,
    mode: str = "copy",
    overwrite: bool = False,
) -> ImportResult:
    """Manifest from ``SRC/<label>/<files>``; see the module docstring for patient ids."""
    src, site_dir = _prepare(src, site_dir, overwrite)
    pattern = re.compile(patient_pattern) if patient_pattern else None
    by_csv = _patient_ids_from_csv(patient_csv) if patient_csv else None
    placer = _Placer(src, site_dir, mode)
    rows: list[ManifestRow] = []
    skipped: list[tuple[str, str]] = []
    for label_dir in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if label_dir.resolve() == site_dir.resolve():
            continue
        for path in _image_files(label_dir, site_dir):
            below = path.relative_to(label_dir).as_posix()
            patient = path.stem
            if by_csv is not None:
                rel = path.relative_to(src).as_posix()
                found = by_csv.get(rel, by_csv.get(path.name))
                if found is None:
                    skipped.append((rel, f"not listed in {Path(patient_csv).name}"))
                    continue
                patient = found
            elif pattern is not None:
                found = _pattern_patient(pattern, below)
                if not found:
                    skipped.append(
                        (path.relative_to(src).as_posix(), "patient pattern does not match")
                    )
                    continue
                patient = found
            rows.append(ManifestRow(placer.place(path), label_dir.name, patient))
    if not rows:
        raise ImporterError(f"{src}: no images found in <label>/ sub-folders")
    manifest = write_manifest(site_dir, rows)
    return ImportResult(rows, manifest, skipped, placer.copied)


def _parse_mura(parts: tuple[str, ...]) -> tuple[str, str, str, str] | None:
    """(view, patient, study_id, label) from the last four path parts, or None."""
    if len(parts) < 4:
        return None
    body, patient, study = (
        _MURA_BODYPART.match(parts[-4]),
        _MURA_PATIENT.match(parts[-3]),
        _MURA_STUDY.match(parts[-2]),
    )
    if not (body and patient and study):
        return None
    view = body.group(1).lower()
    study_id = f"{view}/patient{patient.group(1)}/study{study.group(1)}"
    return view, patient.group(1), study_id, study.group(2)


def import_mura(
    src: Path, site_dir: Path, *, mode: str = "copy", overwrite: bool = False
) -> ImportResult:
    """Manifest from the MURA layout found anywhere below ``src``."""
    src, site_dir = _prepare(src, site_dir, overwrite)
    placer = _Placer(src, site_dir, mode)
    rows: list[ManifestRow] = []
    skipped: list[tuple[str, str]] = []
    for path in _image_files(src, site_dir):
        relative = path.relative_to(src)
        parsed = _parse_mura(relative.parts)
        if parsed is None:
            skipped.append((relative.as_posix(), "not XR_<BODYPART>/patient<id>/study<n>_<label>/"))
            continue
        view, patient, study_id, label = parsed
        rows.append(ManifestRow(placer.place(path), label, patient, view, study_id))
    if not rows:
        raise ImporterError(f"{src}: no MURA images (XR_<BODYPART>/patient<id>/study<n>_...) found")
    manifest = write_manifest(site_dir, rows)
    return ImportResult(rows, manifest, skipped, placer.copied)
