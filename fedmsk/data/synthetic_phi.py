"""Fake but realistic patient and study identifiers for the synthetic DICOM headers.

The strings are made to be distinctive (invented Nordic-sounding surnames, ``PX`` patient IDs,
``AC`` accession numbers, ``2.25.`` UIDs), so a privacy test can search every byte that leaves a
node for them without tripping over ordinary words or numbers. Dates are realistic too, but an
8-digit date can occur by chance inside a float, so :func:`phi_strings` leaves them out unless
asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.uid import generate_uid

from fedmsk.data.dicom_write import DicomPHI

_FAMILY_HEADS = (
    "Brand", "Kvist", "Orm", "Vall", "Thorn", "Hest", "Lind", "Quel", "Rav", "Sten",
    "Wend", "Yar", "Zell", "Falk", "Grim", "Skog", "Ulf", "Hjal", "Norr", "Bjork",
)  # fmt: skip
_FAMILY_TAILS = (
    "vold", "strom", "heim", "quist", "berg", "mark", "dalen", "rud", "holt",
    "wick", "stad", "mere", "gard", "lund", "sater", "nes",
)  # fmt: skip
_GIVEN = (
    "Ingrid", "Torvald", "Margit", "Eskil", "Solveig", "Bertil", "Ylva", "Henrik",
    "Astrid", "Leif", "Sigrun", "Anselm", "Ragnhild", "Oddvar", "Runa", "Kjeld",
)  # fmt: skip
_TOWN_TAILS = ("haven", "fjord", "vik", "kirk", "torp", "by")
_HOSPITAL_KINDS = ("University Hospital", "County Hospital", "Orthopaedic Clinic", "Medical Centre")


@dataclass(frozen=True)
class PatientIdentity:
    """One fake patient and the one study the synthetic data holds of them."""

    patient_id: str
    patient_name: str
    family_name: str
    birth_date: str
    sex: str
    study_date: str
    study_time: str
    accession_number: str
    referring_physician: str
    study_instance_uid: str
    series_instance_uid: str


def _surname(rng: np.random.Generator) -> str:
    return str(rng.choice(_FAMILY_HEADS)) + str(rng.choice(_FAMILY_TAILS))


def institution_name(rng: np.random.Generator) -> str:
    town = str(rng.choice(_FAMILY_HEADS)) + str(rng.choice(_TOWN_TAILS))
    return f"{town} {rng.choice(_HOSPITAL_KINDS)}"


def _date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    year = int(rng.integers(first_year, last_year + 1))
    return f"{year:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def patient_identity(
    rng: np.random.Generator, site_index: int, patient_index: int, entropy: list[int]
) -> PatientIdentity:
    """Draw a patient; ``entropy`` (seed, task, site, patient) makes the UIDs reproducible.

    The patient index is part of the ID, so IDs are unique within a center by construction.
    """
    family = _surname(rng)
    given = str(rng.choice(_GIVEN))
    doctor = f"{_surname(rng)}^{rng.choice(_GIVEN)}^^Dr"
    study = generate_uid(entropy_srcs=[str(x) for x in entropy] + ["study"])
    series = generate_uid(entropy_srcs=[str(x) for x in entropy] + ["series"])
    return PatientIdentity(
        patient_id=f"PX{site_index:02d}{int(rng.integers(0, 10**4)):04d}{patient_index:03d}",
        patient_name=f"{family}^{given}",
        family_name=family,
        birth_date=_date(rng, 1935, 2006),
        sex=str(rng.choice(["F", "M"])),
        study_date=_date(rng, 2014, 2024),
        study_time=f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}00",
        accession_number=f"AC{int(rng.integers(10**8, 10**9))}",
        referring_physician=doctor,
        study_instance_uid=study,
        series_instance_uid=series,
    )


def dicom_phi(
    identity: PatientIdentity,
    *,
    institution: str,
    description: str,
    body_part: str,
    laterality: str,
    view_position: str,
) -> DicomPHI:
    return DicomPHI(
        patient_name=identity.patient_name,
        patient_id=identity.patient_id,
        birth_date=identity.birth_date,
        sex=identity.sex,
        study_date=identity.study_date,
        study_time=identity.study_time,
        institution_name=institution,
        accession_number=identity.accession_number,
        referring_physician=identity.referring_physician,
        study_description=description,
        study_instance_uid=identity.study_instance_uid,
        series_instance_uid=identity.series_instance_uid,
        body_part=body_part,
        laterality=laterality,
        view_position=view_position,
    )


def identity_strings(identity: PatientIdentity, *, include_dates: bool) -> set[str]:
    values = {
        identity.patient_id,
        identity.patient_name,
        identity.family_name,
        identity.accession_number,
        identity.referring_physician.split("^")[0],
        identity.study_instance_uid,
        identity.series_instance_uid,
    }
    if include_dates:
        values |= {identity.birth_date, identity.study_date}
    return values
