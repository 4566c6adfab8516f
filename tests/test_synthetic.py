"""The synthetic federation generator: layout, determinism, DICOM variety, PHI, reader studies."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from fedmsk.data import synthetic
from fedmsk.data.manifest import read_manifest
from fedmsk.data.synthetic import (
    TASKS,
    _reader_rows,
    _SiteResult,
    generate_federation,
    load_federation,
    phi_strings,
)
from fedmsk.data.synthetic_tasks import get_task

TINY = {"centers": 3, "seed": 7, "scale": 0.2, "image_size_range": (48, 80)}


@pytest.fixture(scope="module")
def fracture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fracture")
    generate_federation(out, "xray_fracture", **TINY)
    return out


@pytest.fixture(scope="module")
def atfl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("atfl")
    generate_federation(out, "atfl_us", **TINY)
    return out


def _dicoms(root: Path) -> list[Path]:
    return sorted(root.glob("site*/images/*.dcm"))


def test_layout_and_federation_json(fracture: Path) -> None:
    doc = json.loads((fracture / "federation.json").read_text())
    assert doc["task"] == "xray_fracture" and doc["seed"] == 7
    assert doc["classes"] == ["normal", "fracture"]
    assert [s["alias"] for s in doc["sites"]] == ["site00", "site01", "site02"]
    assert [s["role"] for s in doc["sites"]] == ["train", "train", "heldout"]
    info = load_federation(fracture)
    assert [s.alias for s in info.heldout_sites] == ["site02"]
    assert len(info.train_sites) == 2
    for site in info.sites:
        assert (site.path / "manifest.csv").is_file()
        assert site.n_images == len(read_manifest(site.path))


def test_manifests_are_valid_with_several_images_per_patient(fracture: Path) -> None:
    spec = get_task("xray_fracture")
    for site in load_federation(fracture).sites:
        rows = read_manifest(site.path)
        assert {r.label for r in rows} == set(spec.classes)
        per_patient = Counter(r.patient_id for r in rows)
        assert min(per_patient.values()) >= 2
        for row in rows:
            assert (site.path / row.image).is_file()
            assert row.view in spec.views and row.laterality in ("L", "R") and row.study_id
        labels = {pid: {r.label for r in rows if r.patient_id == pid} for pid in per_patient}
        assert all(len(v) == 1 for v in labels.values())


def test_same_seed_gives_identical_manifests_and_pixels(fracture: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_federation(again, "xray_fracture", **TINY)
    for site in ("site00", "site01", "site02"):
        assert (again / site / "manifest.csv").read_bytes() == (
            fracture / site / "manifest.csv"
        ).read_bytes()
    for path in _dicoms(fracture):
        twin = again / path.relative_to(fracture)
        assert np.array_equal(dcmread(path).pixel_array, dcmread(twin).pixel_array)
    other = tmp_path / "other"
    generate_federation(other, "xray_fracture", **{**TINY, "seed": 8})
    assert (other / "site00" / "manifest.csv").read_bytes() != (
        fracture / "site00" / "manifest.csv"
    ).read_bytes()


def test_centers_drawn_in_worker_processes_are_the_same_files(
    fracture: Path, tmp_path: Path
) -> None:
    """Centers drawn side by side (``workers=2``) give the serial draw's files, in plan order."""
    if not synthetic._CAN_FORK:
        pytest.skip("worker processes are forked, which this platform does not do")
    done: list[str] = []
    parallel = tmp_path / "parallel"
    generate_federation(
        parallel, "xray_fracture", **TINY, workers=2, progress=lambda a, _d, _t: done.append(a)
    )
    assert sorted(done) == ["site00", "site01", "site02"]
    assert (parallel / "federation.json").read_text() == (fracture / "federation.json").read_text()
    for site in ("site00", "site01", "site02"):
        for name in ("manifest.csv", synthetic.LESIONS_FILE):
            if (fracture / site / name).exists():
                assert (parallel / site / name).read_bytes() == (
                    fracture / site / name
                ).read_bytes()
    paths = _dicoms(fracture)
    assert paths and [p.relative_to(fracture) for p in paths] == [
        p.relative_to(parallel) for p in _dicoms(parallel)
    ]
    for path in paths:
        twin = parallel / path.relative_to(fracture)
        assert np.array_equal(dcmread(path).pixel_array, dcmread(twin).pixel_array)


def test_centers_differ_in_encoding_and_acquisition(fracture: Path) -> None:
    headers = {}
    for site in ("site00", "site01", "site02"):
        ds = dcmread(next((fracture / site / "images").glob("*.dcm")))
        headers[site] = ds
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in headers.values()}
    assert len(syntaxes) == 3
    assert {ds.PhotometricInterpretation for ds in headers.values()} == {
        "MONOCHROME1",
        "MONOCHROME2",
    }
    assert len({int(ds.BitsStored) for ds in headers.values()}) >= 2
    signed = [ds for ds in headers.values() if ds.PixelRepresentation == 1]
    assert signed and float(signed[0].RescaleIntercept) != 0.0
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in headers.values()}
    assert len(sizes) >= 2
    prevalences = []
    for site in ("site00", "site01"):
        rows = read_manifest(fracture / site)
        prevalences.append(sum(r.label == "fracture" for r in rows) / len(rows))
    assert prevalences[0] != prevalences[1]


def test_dicom_files_decode_with_the_project_loader(fracture: Path) -> None:
    images = pytest.importorskip("fedmsk.data.images")
    for path in _dicoms(fracture)[::5]:
        loaded = images.load_image(path)
        assert loaded.pixels.dtype == np.float32 and loaded.pixels.ndim == 3
        assert loaded.pixels.min() >= 0.0 and loaded.pixels.max() <= 1.0
        assert loaded.pixels.std() > 0.02


def test_phi_in_headers_but_not_in_file_names(fracture: Path) -> None:
    secrets = phi_strings(fracture)
    with_dates = phi_strings(fracture, include_dates=True)
    assert secrets < with_dates
    manifest_ids = {
        r.patient_id for s in load_federation(fracture).sites for r in read_manifest(s.path)
    }
    assert manifest_ids <= secrets
    for path in _dicoms(fracture)[::3]:
        ds = dcmread(path)
        assert ds.PatientID in secrets and str(ds.PatientName) in secrets
        assert ds.AccessionNumber in secrets and ds.StudyInstanceUID in secrets
        assert ds.InstitutionName in secrets and ds.PatientBirthDate in with_dates
    names = " ".join(str(p.relative_to(fracture)) for p in fracture.rglob("*"))
    assert not [s for s in secrets if s in names]
    assert all(len(s) >= 5 for s in secrets)


def test_ultrasound_task_has_colour_and_us_modality(atfl: Path) -> None:
    photometrics = set()
    for path in _dicoms(atfl):
        ds = dcmread(path)
        assert ds.Modality == "US" and int(ds.BitsStored) == 8
        photometrics.add(ds.PhotometricInterpretation)
    assert "MONOCHROME2" in photometrics and photometrics & {"RGB", "YBR_FULL", "YBR_FULL_422"}
    labels = {r.label for s in load_federation(atfl).sites for r in read_manifest(s.path)}
    assert labels == {"normal", "partial_tear", "complete_tear"}


def test_reader_csv_covers_heldout_images(atfl: Path) -> None:
    info = load_federation(atfl)
    assert list(info.readers) == ["site02"]
    with (atfl / info.readers["site02"]).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"reader", "experience", "image", "call", "confidence"}
    images = {r.image for r in read_manifest(atfl / "site02")}
    assert {r["image"] for r in rows} == images
    readers = {(r["reader"], r["experience"]) for r in rows}
    assert Counter(e for _, e in readers) == {"junior": 4, "intermediate": 4, "senior": 4}
    assert {r["call"] for r in rows} <= set(get_task("atfl_us").classes)
    assert len(rows) == 12 * len(images)


def test_reader_accuracy_rises_with_experience() -> None:
    from fedmsk.data.manifest import ManifestRow

    spec = get_task("atfl_us")
    rng = np.random.default_rng(0)
    labels = [int(x) for x in rng.integers(0, 3, 600)]
    result = _SiteResult(
        rows=[
            ManifestRow(image=f"images/img_{k:05d}.dcm", label=spec.classes[y], patient_id="x")
            for k, y in enumerate(labels)
        ],
        visibility=[float(v) for v in rng.uniform(0, 1, 600)],
        labels=labels,
    )
    assert spec.readers is not None
    rows = _reader_rows(spec, spec.readers, result, np.random.default_rng(1))
    truth = {r.image: r.label for r in result.rows}
    accuracy = {}
    for level in ("junior", "intermediate", "senior"):
        mine = [r for r in rows if r["experience"] == level]
        accuracy[level] = np.mean(
            [(r["call"] != "normal") == (truth[r["image"]] != "normal") for r in mine]
        )
    assert accuracy["junior"] < accuracy["intermediate"] < accuracy["senior"] < 0.97


@pytest.mark.parametrize("task", ["implant6", "dislocation_xray"])
def test_other_tasks_generate(task: str, tmp_path: Path) -> None:
    centers = 4 if task == "dislocation_xray" else 2
    info = generate_federation(tmp_path, task, **{**TINY, "centers": centers})
    spec = TASKS[task]
    labels = {r.label for s in info.sites for r in read_manifest(s.path)}
    assert labels == set(spec.classes)
    if task == "dislocation_xray":
        assert [s.role for s in info.sites] == ["train", "heldout", "heldout", "heldout"]
        web = {p.suffix for p in (tmp_path / "site00" / "images").iterdir()}
        assert web <= {".png", ".jpg"} and web
        assert {r.view for r in read_manifest(tmp_path / "site00")} <= set(spec.views)
        assert _dicoms(tmp_path)


def test_user_errors_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'.*xray_fracture"):
        generate_federation(tmp_path, "nope")
    with pytest.raises(ValueError, match="--centers"):
        generate_federation(tmp_path, "xray_fracture", centers=1)
    with pytest.raises(ValueError, match="federation.json"):
        load_federation(tmp_path)


def test_cli_generates_and_refuses_a_non_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmsk.cli import main

    out = tmp_path / "fed"
    argv = ["data", "synth", str(out), "--task", "vcf_xray", "--centers", "2", "--scale", "0.1"]
    assert main(argv) == 0
    info = load_federation(out)
    assert info.task == "vcf_xray" and list(info.readers) == ["site01"]
    assert main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--seed", "3"]) == 0
    assert load_federation(out).seed == 3
