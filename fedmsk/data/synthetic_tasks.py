"""The synthetic tasks: what each one classifies, and how its federation is laid out.

A task here is the generator's side of a ``configs/task/*.yaml`` file: the class names (index =
label id), the views, the imaging modality and the shape of the federation (how many centers,
which of them are held out, which carry a reader study). Configs refer to a task by name through
``task.synthetic_task``; adding a synthetic task means adding one :class:`TaskSpec` and, when it
needs a new picture, one renderer in :mod:`fedmsk.data.synthetic_render`.
"""

from __future__ import annotations

from dataclasses import dataclass

IMPLANT_CLASSES = (
    "dynamic_hip_screw",
    "proximal_femoral_nail",
    "cannulated_screws",
    "hemiarthroplasty",
    "total_hip_arthroplasty",
    "plate_and_screws",
)
LIGAMENT_CLASSES = ("normal", "partial_tear", "complete_tear")


@dataclass(frozen=True)
class ReaderGroup:
    """Readers of one experience level and how well they call an image.

    ``sensitivity`` / ``specificity`` are the targets for a reader of average skill on an image
    of average difficulty; a reader's own skill and each image's visibility move them.
    """

    experience: str
    count: int
    sensitivity: float
    specificity: float


@dataclass(frozen=True)
class ReaderStudy:
    """Readers who called every image of the held-out center(s)."""

    groups: tuple[ReaderGroup, ...]


@dataclass(frozen=True)
class TaskSpec:
    """One synthetic task.

    ``renderer`` names the picture model; ``modality`` is ``xray`` or ``us`` (the loader's view
    of it) and ``dicom_modality`` what goes into the DICOM header. ``images_per_patient`` is the
    (min, max) number of images per patient; ``one_image_per_view`` makes every patient have
    exactly one image of each view. ``heldout`` is ``last`` (the last center is the external
    test center) or ``all_but_first`` (center 0 trains, every other center is external).
    ``web_collection_site`` marks a center whose images are PNG/JPEG files collected from the
    internet instead of hospital DICOM.
    """

    name: str
    classes: tuple[str, ...]
    positive_class: str | None
    views: tuple[str, ...]
    modality: str
    dicom_modality: str
    renderer: str
    default_centers: int = 13
    images_per_patient: tuple[int, int] = (2, 3)
    one_image_per_view: bool = False
    heldout: str = "last"
    web_collection_site: int | None = None
    readers: ReaderStudy | None = None
    body_part: str = ""
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_ATFL_READERS = ReaderStudy(
    groups=(
        ReaderGroup("junior", 4, sensitivity=0.70, specificity=0.74),
        ReaderGroup("intermediate", 4, sensitivity=0.80, specificity=0.83),
        ReaderGroup("senior", 4, sensitivity=0.89, specificity=0.91),
    )
)
_VCF_READERS = ReaderStudy(
    groups=(ReaderGroup("surgeon", 2, sensitivity=0.80, specificity=0.82),),
)


def _ligament(name: str, readers: ReaderStudy | None, description: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        classes=LIGAMENT_CLASSES,
        positive_class=None,
        views=("long_axis", "anterior_drawer"),
        modality="us",
        dicom_modality="US",
        renderer="ligament_us",
        images_per_patient=(1, 3),
        readers=readers,
        body_part="ANKLE",
        description=description,
    )


def _implants(name: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        classes=IMPLANT_CLASSES,
        positive_class=None,
        views=("ap", "lateral"),
        modality="xray",
        dicom_modality="CR",
        renderer="implant_xray",
        images_per_patient=(1, 2),
        body_part="HIP",
        description="Proximal femur implant identification on hip radiographs (6 classes).",
    )


TASKS: dict[str, TaskSpec] = {
    "xray_fracture": TaskSpec(
        name="xray_fracture",
        classes=("normal", "fracture"),
        positive_class="fracture",
        views=("ap", "lateral", "oblique"),
        modality="xray",
        dicom_modality="CR",
        renderer="fracture_xray",
        images_per_patient=(2, 3),
        body_part="EXTREMITY",
        description="Long-bone radiographs; positives show a thin oblique lucent line or step.",
    ),
    "implant6": _implants("implant6"),
    "femoral_device_xray": _implants("femoral_device_xray"),
    "ligament_us": _ligament(
        "ligament_us", None, "Ankle ligament ultrasound graded normal / partial / complete tear."
    ),
    "atfl_us": _ligament(
        "atfl_us",
        _ATFL_READERS,
        "ATFL ultrasound (13 centers) with a 12-reader study on the external center.",
    ),
    "gout_mtp1_us": TaskSpec(
        name="gout_mtp1_us",
        classes=("normal", "abnormal"),
        positive_class="abnormal",
        views=("dorsal", "medial", "plantar"),
        modality="us",
        dicom_modality="US",
        renderer="gout_us",
        images_per_patient=(3, 3),
        one_image_per_view=True,
        body_part="FOOT",
        description="First MTP joint ultrasound: double contour, tophus, erosion, effusion.",
    ),
    "vcf_xray": TaskSpec(
        name="vcf_xray",
        classes=("old", "fresh"),
        positive_class="fresh",
        views=("lateral_standing", "lateral_supine"),
        modality="xray",
        dicom_modality="DX",
        renderer="vcf_xray",
        images_per_patient=(1, 2),
        readers=_VCF_READERS,
        body_part="SPINE",
        description="Lateral spine radiographs: fresh vs old vertebral compression fracture.",
    ),
    "dislocation_xray": TaskSpec(
        name="dislocation_xray",
        classes=("normal", "dislocated"),
        positive_class="dislocated",
        views=("shoulder", "elbow", "hip", "tha"),
        modality="xray",
        dicom_modality="CR",
        renderer="dislocation_xray",
        default_centers=4,
        images_per_patient=(1, 2),
        heldout="all_but_first",
        web_collection_site=0,
        description="Joint dislocation; center 0 is a web collection, the hospitals are external.",
    ),
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name; the error lists the known names."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise ValueError(f"unknown synthetic task {name!r}; known tasks: {known}") from None
