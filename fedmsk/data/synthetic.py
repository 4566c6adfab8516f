"""Synthetic multi-center federations: the data every demo, test and benchmark runs on.

There is no real patient data in this project, so the generator has to produce data that is
worth learning from: a class signal a small CNN learns over a few epochs (not in one step),
several images per patient that share anatomy, centers that differ the way hospitals do
(contrast, noise, blur, matrix size, MONOCHROME1, 8/12/16-bit and signed pixels, compressed
transfer syntaxes, case mix), a held-out external center, reader studies, and realistic fake
PHI in every header so privacy tests have something to look for.

Everything is derived from ``(seed, task, center, patient, image)`` through independent random
streams: the same seed gives byte-identical manifests and pixel arrays, and
:func:`phi_strings` can re-derive the identifiers without reading a single image.

Layout (see docs/interfaces.md)::

    OUT/federation.json          task, seed, classes, sites (alias, dir, role), extras
    OUT/siteNN/manifest.csv      image,label,patient_id,view,study_id,laterality,split
    OUT/siteNN/images/img_NNNNN.dcm   (.png / .jpg for a web-collection center)
    OUT/readers/<alias>.csv      reader,experience,image,call,confidence
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmsk.data import synthetic_us, synthetic_xray
from fedmsk.data.federation import FEDERATION_FILE, FederationError
from fedmsk.data.loader_settings import usable_cores
from fedmsk.data.manifest import ManifestRow, write_manifest
from fedmsk.data.synthetic_phi import (
    PatientIdentity,
    dicom_phi,
    identity_strings,
    institution_name,
    patient_identity,
)
from fedmsk.data.synthetic_sites import (
    SiteProfile,
    acquire_us,
    acquire_xray_with_lesion,
    make_site_profile,
    to_stored_grey,
    web_variant,
)
from fedmsk.data.synthetic_tasks import TASKS, ReaderStudy, TaskSpec, get_task

__all__ = [
    "TASKS",
    "FederationInfo",
    "SiteInfo",
    "TaskSpec",
    "generate_federation",
    "load_federation",
    "phi_strings",
]

GENERATOR = "fedmsk.synthetic/1"
DEFAULT_IMAGE_SIZE_RANGE = (96, 256)
READERS_DIR = "readers"
# Worker processes are forked, so only where fork is safe and usual (Linux); elsewhere serial.
_CAN_FORK = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
# Below this many planned images a federation is drawn in this process: starting worker
# processes (about a second each) would cost more than they save (tests draw tiny ones).
PARALLEL_MIN_IMAGES = 600

_STREAM_SITE, _STREAM_PATIENT, _STREAM_IMAGE, _STREAM_READER, _STREAM_PHI = 1, 2, 3, 4, 5

RenderFn = Callable[[dict[str, Any], int, str, np.random.Generator, int], synthetic_xray.Rendered]
AnatomyFn = Callable[[np.random.Generator, int], dict[str, Any]]
_RENDERERS: dict[str, tuple[AnatomyFn, RenderFn]] = {
    "fracture_xray": (synthetic_xray.fracture_anatomy, synthetic_xray.fracture_render),
    "implant_xray": (synthetic_xray.implant_anatomy, synthetic_xray.implant_render),
    "vcf_xray": (synthetic_xray.vcf_anatomy, synthetic_xray.vcf_render),
    "dislocation_xray": (synthetic_xray.dislocation_anatomy, synthetic_xray.dislocation_render),
    "ligament_us": (synthetic_us.ligament_anatomy, synthetic_us.ligament_render),
    "gout_us": (synthetic_us.gout_anatomy, synthetic_us.gout_render),
}
_VIEW_POSITIONS = {
    "ap": "AP",
    "lateral": "LL",
    "oblique": "OBL",
    "lateral_standing": "LL",
    "lateral_supine": "LL",
}


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class SiteInfo:
    """One center of a federation on disk."""

    alias: str
    dir: str
    role: str
    path: Path
    n_images: int | None = None
    technical: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FederationInfo:
    """What ``federation.json`` says: task, seed, classes, centers and reader studies."""

    root: Path
    task: str
    seed: int
    classes: tuple[str, ...]
    sites: tuple[SiteInfo, ...]
    readers: dict[str, str] = field(default_factory=dict)
    centers: int | None = None
    scale: float | None = None

    @property
    def train_sites(self) -> tuple[SiteInfo, ...]:
        return tuple(s for s in self.sites if s.role == "train")

    @property
    def heldout_sites(self) -> tuple[SiteInfo, ...]:
        return tuple(s for s in self.sites if s.role == "heldout")

    def site(self, alias: str) -> SiteInfo:
        for s in self.sites:
            if s.alias == alias:
                return s
        raise FederationError(f"{self.root / FEDERATION_FILE}: no site {alias!r}")


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _PlannedImage:
    file: str
    view: str
    laterality: str
    image_index: int


@dataclass(frozen=True)
class _PlannedPatient:
    index: int
    label: int
    identity: PatientIdentity
    study_id: str
    images: tuple[_PlannedImage, ...]


@dataclass(frozen=True)
class _SitePlan:
    profile: SiteProfile
    institution: str
    patients: tuple[_PlannedPatient, ...]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def _task_code(task: str) -> int:
    return zlib.crc32(task.encode("utf-8"))


def _roles(spec: TaskSpec, centers: int) -> list[str]:
    if spec.heldout == "all_but_first":
        return ["train"] + ["heldout"] * (centers - 1)
    return ["train"] * (centers - 1) + ["heldout"]


def _patient_views(spec: TaskSpec, rng: np.random.Generator) -> list[str]:
    if spec.one_image_per_view:
        return list(spec.views)
    if spec.renderer == "dislocation_xray":
        joint = str(rng.choice(spec.views))
        return [joint] * int(
            rng.integers(spec.images_per_patient[0], spec.images_per_patient[1] + 1)
        )
    count = int(rng.integers(spec.images_per_patient[0], spec.images_per_patient[1] + 1))
    views = list(spec.views)
    start = 0 if rng.random() < 0.8 else int(rng.integers(0, len(views)))
    return [views[(start + k) % len(views)] for k in range(count)]


def _labels(
    profile: SiteProfile, n_patients: int, num_classes: int, rng: np.random.Generator
) -> list[int]:
    """Labels drawn from the center's prevalence, with every class present at least twice."""
    labels = [k % num_classes for k in range(min(2 * num_classes, n_patients))]
    extra = n_patients - len(labels)
    if extra > 0:
        labels += [
            int(x) for x in rng.choice(num_classes, size=extra, p=np.array(profile.class_probs))
        ]
    order = rng.permutation(len(labels))
    return [labels[i] for i in order]


def _plan_site(
    spec: TaskSpec, seed: int, index: int, role: str, scale: float, size_range: tuple[int, int]
) -> _SitePlan:
    code = _task_code(spec.name)
    rng = _rng(seed, code, index, _STREAM_SITE)
    web = spec.web_collection_site == index
    profile = make_site_profile(
        rng=rng,
        index=index,
        role=role,
        modality=spec.modality,
        web=web,
        num_classes=spec.num_classes,
        size_range=size_range,
        scale=scale,
    )
    institution = institution_name(_rng(seed, code, index, _STREAM_PHI))
    mean_ipp = len(spec.views) if spec.one_image_per_view else sum(spec.images_per_patient) / 2
    n_patients = max(int(round(profile.target_images / mean_ipp)), 2 * spec.num_classes)
    labels = _labels(profile, n_patients, spec.num_classes, rng)
    suffix = ".dcm" if not web else ""
    patients = []
    image_index = 0
    for p, label in enumerate(labels):
        prng = _rng(seed, code, index, p, _STREAM_PATIENT)
        identity = patient_identity(prng, index, p, [seed, code, index, p])
        side = "" if spec.renderer == "vcf_xray" else str(prng.choice(["L", "R"]))
        images = []
        for view in _patient_views(spec, prng):
            images.append(
                _PlannedImage(f"images/img_{image_index:05d}{suffix}", view, side, image_index)
            )
            image_index += 1
        study_id = f"ST{index:02d}{p:05d}"
        patients.append(_PlannedPatient(p, label, identity, study_id, tuple(images)))
    return _SitePlan(profile, institution, tuple(patients))


def _plan(
    task: str, centers: int, seed: int, scale: float, size_range: tuple[int, int]
) -> list[_SitePlan]:
    spec = get_task(task)
    if centers < 2:
        raise ValueError(
            f"--centers must be at least 2 (one training and one held-out center), got {centers}"
        )
    if scale <= 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    lo, hi = size_range
    if not 16 <= lo <= hi:
        raise ValueError(
            f"image_size_range must be (min, max) with 16 <= min <= max, got {size_range}"
        )
    return [
        _plan_site(spec, seed, i, role, scale, size_range)
        for i, role in enumerate(_roles(spec, centers))
    ]


# --------------------------------------------------------------------------- rendering


def _canvas_size(profile: SiteProfile) -> int:
    return int(np.clip(max(profile.rows, profile.cols), 64, 256))


LESIONS_FILE = "lesions.csv"
Box = tuple[float, float, float, float]


def lesion_box(mask: np.ndarray | None) -> Box | None:
    """(top, left, bottom, right) of a placed lesion mask as fractions of the image's height
    and width, so the box survives any later resize; None when the finding left the field."""
    if mask is None or float(mask.max()) < 0.25:
        return None
    rows, cols = np.nonzero(mask >= 0.5 * float(mask.max()))
    height, width = mask.shape
    return (
        rows.min() / height,
        cols.min() / width,
        (rows.max() + 1) / height,
        (cols.max() + 1) / width,
    )


def _render_pixels(
    spec: TaskSpec,
    plan: _SitePlan,
    patient: _PlannedPatient,
    image: _PlannedImage,
    seed: int,
    anatomy: dict[str, Any],
) -> tuple[np.ndarray, float, np.random.Generator, Box | None]:
    """Draw and acquire one image: float brightness (grey) or uint8 RGB (ultrasound), and
    where its finding is when the renderer knows it."""
    profile = plan.profile
    rng = _rng(
        seed, _task_code(spec.name), profile.index, patient.index, image.image_index, _STREAM_IMAGE
    )
    _, render = _RENDERERS[spec.renderer]
    drawn = render(anatomy, patient.label, image.view, rng, _canvas_size(profile))
    if spec.modality == "us":
        return acquire_us(drawn.signal, profile, rng), drawn.visibility, rng, None
    pixels, lesion = acquire_xray_with_lesion(
        drawn.signal, drawn.lesion, profile, rng, laterality=image.laterality
    )
    # a web picture is rescaled and framed at random: its box is not kept
    box = lesion_box(lesion) if profile.kind != "web" else None
    return pixels, drawn.visibility, rng, box


def _write_image(
    site_dir: Path,
    spec: TaskSpec,
    plan: _SitePlan,
    patient: _PlannedPatient,
    image: _PlannedImage,
    pixels: np.ndarray,
    rng: np.random.Generator,
) -> str:
    """Write one image in the center's format; returns its manifest path (relative)."""
    from fedmsk.data.dicom_write import write_dicom

    profile = plan.profile
    if profile.kind == "web":
        return _write_web_image(site_dir, image, pixels, rng)
    phi = dicom_phi(
        patient.identity,
        institution=plan.institution,
        description=f"{spec.body_part or spec.name.upper()} {image.view.upper()}",
        body_part=spec.body_part,
        laterality=image.laterality,
        view_position=_VIEW_POSITIONS.get(image.view, ""),
    )
    path = site_dir / image.file
    spacing = (profile.pixel_spacing, profile.pixel_spacing)
    if spec.modality == "us":
        if profile.photometric == "MONOCHROME2":
            pixels = np.round(pixels.astype(np.float32).mean(axis=-1)).astype(np.uint8)
        write_dicom(
            path,
            pixels,
            photometric=profile.photometric,
            bits_stored=8,
            transfer_syntax=profile.transfer_syntax,
            pixel_spacing=spacing,
            phi=phi,
            modality=spec.dicom_modality,
        )
        return image.file
    stored = to_stored_grey(pixels, profile)
    write_dicom(
        path,
        stored.pixels,
        photometric=profile.photometric,
        bits_stored=profile.bits_stored,
        signed=profile.signed,
        transfer_syntax=profile.transfer_syntax,
        pixel_spacing=spacing,
        window=stored.window,
        rescale=stored.rescale,
        phi=phi,
        modality=spec.dicom_modality,
    )
    return image.file


def _write_web_image(
    site_dir: Path, image: _PlannedImage, pixels: np.ndarray, rng: np.random.Generator
) -> str:
    from PIL import Image

    arr, suffix, quality = web_variant(pixels, rng)
    rel = image.file + suffix
    path = site_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = Image.fromarray(arr)
    if quality:
        pil.save(path, format="JPEG", quality=quality)
    else:
        pil.save(path, format="PNG")
    return rel


@dataclass
class _SiteResult:
    rows: list[ManifestRow]
    visibility: list[float]
    labels: list[int]
    lesions: dict[str, Box] = field(default_factory=dict)


def _generate_site(root: Path, spec: TaskSpec, plan: _SitePlan, seed: int) -> _SiteResult:
    site_dir = root / plan.profile.alias
    anatomy_fn, _ = _RENDERERS[spec.renderer]
    result = _SiteResult([], [], [])
    for patient in plan.patients:
        arng = _rng(
            seed, _task_code(spec.name), plan.profile.index, patient.index, _STREAM_PATIENT, 7
        )
        anatomy = anatomy_fn(arng, patient.label)
        for image in patient.images:
            pixels, visibility, rng, box = _render_pixels(spec, plan, patient, image, seed, anatomy)
            rel = _write_image(site_dir, spec, plan, patient, image, pixels, rng)
            if box is not None:
                result.lesions[rel] = box
            result.rows.append(
                ManifestRow(
                    image=rel,
                    label=spec.classes[patient.label],
                    patient_id=patient.identity.patient_id,
                    view=image.view,
                    study_id=patient.study_id,
                    laterality=image.laterality,
                )
            )
            result.visibility.append(visibility)
            result.labels.append(patient.label)
    write_manifest(site_dir, result.rows)
    if result.lesions:
        write_lesions(site_dir, result.lesions)
    _write_privacy_policy(site_dir)
    return result


def _generate_sites(
    out: Path,
    spec: TaskSpec,
    plans: list[_SitePlan],
    seed: int,
    workers: int | None,
    progress: Callable[[str, int, int], None] | None,
) -> list[_SiteResult]:
    """Each center's images, drawn in worker processes when that pays (results in plan order).

    Why: generating is pure numpy on one core (about 80 s for the gout study's 6,800 images), and
    every center has its own random streams, so centers can be drawn at once on a node's cores.
    """
    sizes = [sum(len(patient.images) for patient in plan.patients) for plan in plans]
    if workers is None:
        workers = usable_cores() if sum(sizes) >= PARALLEL_MIN_IMAGES else 1
    if not _CAN_FORK:
        workers = 1
    workers = max(1, min(int(workers), len(plans)))
    if workers == 1:
        results = []
        for done, plan in enumerate(plans, start=1):
            results.append(_generate_site(out, spec, plan, seed))
            if progress is not None:
                progress(plan.profile.alias, done, len(plans))
        return results
    # Largest centers first, so that the last to start is a small one. Forked workers: "spawn"
    # would re-run the caller's script in each worker (a script without a __main__ guard then
    # fails). The workers use numpy and pydicom only, never torch's thread pools.
    order = sorted(range(len(plans)), key=lambda i: -sizes[i])
    finished: dict[int, _SiteResult] = {}
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_generate_site, out, spec, plans[i], seed): i for i in order}
        for done, future in enumerate(as_completed(futures), start=1):
            i = futures[future]
            finished[i] = future.result()
            if progress is not None:
                progress(plans[i].profile.alias, done, len(plans))
    return [finished[i] for i in range(len(plans))]


# Synthetic images belong to no patient, so a simulated site may spend privacy on them run after
# run; a hospital's own data set gets fedmsk.privacy.ledger's strict default unless it writes
# a policy.
SYNTHETIC_LIFETIME_EPSILON = 1000.0


def _write_privacy_policy(site_dir: Path) -> None:
    from fedmsk.privacy.ledger import POLICY_FILE, policy_text

    why = (
        "Synthetic data (fedmsk's generator): no patient to protect, so the lifetime cap is set\n"
        "high enough for repeated simulations. A hospital sets its own cap for its own data."
    )
    text = policy_text(SYNTHETIC_LIFETIME_EPSILON, why=why)
    (site_dir / POLICY_FILE).write_text(text, encoding="utf-8")


def write_lesions(site_dir: Path, boxes: dict[str, Box]) -> Path:
    """``SITE/lesions.csv``: the generator's ground truth of where each finding is (image path
    as in the manifest, box as fractions), used only to score explanations (pointing game)."""
    path = site_dir / LESIONS_FILE
    lines = ["image,top,left,bottom,right"]
    lines += [
        f"{image},{t:.4f},{left:.4f},{b:.4f},{r:.4f}" for image, (t, left, b, r) in boxes.items()
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_lesions(site_dir: Path) -> dict[str, Box]:
    """The boxes :func:`write_lesions` wrote (empty when the site has none)."""
    path = site_dir / LESIONS_FILE
    if not path.is_file():
        return {}
    boxes: dict[str, Box] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        image, *numbers = line.rsplit(",", 4)
        top, left, bottom, right = (float(x) for x in numbers)
        boxes[image] = (top, left, bottom, right)
    return boxes


# --------------------------------------------------------------------------- reader studies


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(np.log(p / (1 - p)))


def _reader_rows(
    spec: TaskSpec, study: ReaderStudy, result: _SiteResult, rng: np.random.Generator
) -> list[dict[str, str]]:
    """Each reader calls each image; accuracy rises with experience and image visibility."""
    rows = []
    number = 0
    for group in study.groups:
        for _ in range(group.count):
            number += 1
            skill = rng.normal(0.0, 0.25)
            grade_accuracy = min(0.95, 0.55 + 0.4 * group.sensitivity)
            for row, label, vis in zip(result.rows, result.labels, result.visibility, strict=True):
                positive = label != 0
                if positive:
                    p_right = 1 / (
                        1 + np.exp(-(_logit(group.sensitivity) + skill + 2.0 * (vis - 0.6)))
                    )
                else:
                    p_right = 1 / (1 + np.exp(-(_logit(group.specificity) + skill - 2.0 * vis)))
                right = rng.random() < p_right
                call = _reader_call(spec, label, right, grade_accuracy, rng)
                margin = abs(p_right - 0.5) * 2
                confidence = int(
                    np.clip(np.round(1 + 4 * (margin * 0.7 + 0.3 * rng.random())), 1, 5)
                )
                rows.append(
                    {
                        "reader": f"R{number:02d}",
                        "experience": group.experience,
                        "image": row.image,
                        "call": call,
                        "confidence": str(confidence),
                    }
                )
    return rows


def _reader_call(
    spec: TaskSpec, label: int, right: bool, grade_accuracy: float, rng: np.random.Generator
) -> str:
    classes = spec.classes
    if len(classes) == 2:
        return classes[label] if right else classes[1 - label]
    if label == 0:
        return classes[0] if right else classes[int(rng.integers(1, len(classes)))]
    if not right:
        return classes[0]
    if rng.random() < grade_accuracy:
        return classes[label]
    others = [k for k in range(1, len(classes)) if k != label]
    return classes[int(rng.choice(others))] if others else classes[label]


def _write_readers(root: Path, alias: str, rows: list[dict[str, str]]) -> str:
    rel = f"{READERS_DIR}/{alias}.csv"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["reader", "experience", "image", "call", "confidence"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return rel


# --------------------------------------------------------------------------- entry points


def generate_federation(
    out: Path,
    task: str,
    centers: int | None = 13,
    seed: int = 0,
    scale: float = 1.0,
    image_size_range: tuple[int, int] = DEFAULT_IMAGE_SIZE_RANGE,
    progress: Callable[[str, int, int], None] | None = None,
    workers: int | None = None,
) -> FederationInfo:
    """Generate a federation under ``out`` and return what ``federation.json`` records.

    ``centers=None`` uses the task's default. The last center is the held-out external center
    (for ``dislocation_xray`` every center after the web collection is). ``image_size_range``
    bounds the rows/cols a center's scanner produces; ``progress(alias, done, total)`` is called
    after each center, in the order they finish. ``workers`` processes draw centers side by side
    (None: one per usable core for federations of ``PARALLEL_MIN_IMAGES`` or more, else 1); a
    center's images depend only on the seed and its plan, so the files are the same either way.
    """
    spec = get_task(task)
    centers = spec.default_centers if centers is None else centers
    out = Path(out)
    plans = _plan(task, centers, seed, scale, image_size_range)
    out.mkdir(parents=True, exist_ok=True)
    results = _generate_sites(out, spec, plans, seed, workers, progress)
    sites_json = []
    readers: dict[str, str] = {}
    for plan, result in zip(plans, results, strict=True):
        profile = plan.profile
        sites_json.append(
            {
                "alias": profile.alias,
                "dir": profile.alias,
                "role": profile.role,
                "n_images": len(result.rows),
                "n_patients": len(plan.patients),
                "technical": profile.technical_summary(),
            }
        )
        if spec.readers is not None and profile.role == "heldout":
            rrng = _rng(seed, _task_code(task), profile.index, _STREAM_READER)
            readers[profile.alias] = _write_readers(
                out, profile.alias, _reader_rows(spec, spec.readers, result, rrng)
            )
    document = {
        "task": task,
        "seed": seed,
        "classes": list(spec.classes),
        "sites": sites_json,
        "generator": GENERATOR,
        "centers": centers,
        "scale": scale,
        "image_size_range": list(image_size_range),
        "modality": spec.modality,
        "views": list(spec.views),
        "positive_class": spec.positive_class,
        "readers": readers,
    }
    (out / FEDERATION_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return load_federation(out)


def load_federation(root: Path) -> FederationInfo:
    """``ROOT/federation.json`` with the generator's extras (counts, readers, scale).

    Validation is :func:`fedmsk.data.federation.load_federation`'s; errors name the file.
    """
    from fedmsk.data.federation import load_federation as load_layout

    layout = load_layout(Path(root))
    doc = json.loads((layout.root / FEDERATION_FILE).read_text(encoding="utf-8"))
    extras = {str(e["alias"]): e for e in doc["sites"]}
    sites = tuple(
        SiteInfo(
            alias=site.alias,
            dir=site.dir,
            role=site.role,
            path=layout.root / site.dir,
            n_images=extras[site.alias].get("n_images"),
            technical=dict(extras[site.alias].get("technical", {})),
        )
        for site in layout.sites
    )
    return FederationInfo(
        root=layout.root,
        task=layout.task,
        seed=int(doc.get("seed", 0)),
        classes=tuple(layout.classes),
        sites=sites,
        readers=dict(doc.get("readers", {})),
        centers=doc.get("centers"),
        scale=doc.get("scale"),
    )


def phi_strings(out_dir: Path, *, include_dates: bool = False) -> set[str]:
    """Every fake identifier written into the federation's DICOM headers and manifests.

    Re-derived from ``federation.json`` (task, seed, centers, scale), not read from the images,
    so a privacy test can search logs, messages and reports for them. Dates are left out by
    default: an 8-digit date can turn up by chance inside a printed float.
    """
    info = load_federation(out_dir)
    doc = json.loads((Path(out_dir) / FEDERATION_FILE).read_text(encoding="utf-8"))
    if doc.get("generator") != GENERATOR:
        raise FederationError(f"{Path(out_dir) / FEDERATION_FILE}: not written by {GENERATOR}")
    size_range = tuple(doc.get("image_size_range", DEFAULT_IMAGE_SIZE_RANGE))
    plans = _plan(info.task, int(doc["centers"]), info.seed, float(doc["scale"]), size_range)  # type: ignore[arg-type]
    values: set[str] = set()
    for plan in plans:
        if plan.profile.kind != "web":
            values.add(plan.institution)
        for patient in plan.patients:
            values |= identity_strings(patient.identity, include_dates=include_dates)
    return values
