"""Helpers that build small DICOM files for the reader tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import uid

from fedmsk.data.dicom_write import DicomPHI, encode_support, write_dicom

FAKE_PHI = DicomPHI(
    patient_name="Testperson^Alvira^Q",
    patient_id="PID-7733191",
    birth_date="19570304",
    sex="F",
    study_date="20230917",
    study_time="101512",
    institution_name="Saint Fakeworth Hospital",
    accession_number="ACC99887766",
    referring_physician="Quack^Doctor",
    study_description="WRIST 3 VIEWS",
    study_instance_uid="1.2.826.0.1.3680043.8.498.11111111111111111111",
    series_instance_uid="1.2.826.0.1.3680043.8.498.22222222222222222222",
    body_part="HAND",
)
PHI_STRINGS = (
    "Testperson",
    "Alvira",
    "PID-7733191",
    "19570304",
    "20230917",
    "Saint Fakeworth",
    "ACC99887766",
    "Quack",
    "1.2.826.0.1.3680043.8.498.11111111111111111111",
    "1.2.826.0.1.3680043.8.498.22222222222222222222",
)

# One lossless and (where one exists) one lossy syntax per codec family.
LOSSLESS_SYNTAXES = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.RLELossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
)
EXPECTED_DECODER = {
    uid.RLELossless: "pylibjpeg-rle",
    uid.JPEGLSLossless: "pyjpegls",
    uid.JPEGLSNearLossless: "pyjpegls",
    uid.JPEG2000Lossless: "pylibjpeg-openjpeg",
    uid.JPEG2000: "pylibjpeg-openjpeg",
    uid.JPEGLosslessSV1: "gdcm",
    uid.JPEGBaseline8Bit: "pylibjpeg-libjpeg",
}


def require_encoder(transfer_syntax: str) -> None:
    """Skip the calling test, with the reason, when this machine cannot write the syntax."""
    reason = encode_support(transfer_syntax)
    if reason is not None:
        pytest.skip(reason)


def grey_image(
    shape: tuple[int, ...] = (40, 32), bits: int = 12, signed: bool = False, seed: int = 0
) -> np.ndarray:
    """A smooth gradient with noise spanning the whole range (so codecs have real work)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[-2], shape[-1]
    yy, xx = np.mgrid[0:rows, 0:cols]
    base = (xx / max(cols - 1, 1) + yy / max(rows - 1, 1)) / 2
    frames = shape[0] if len(shape) == 3 else 1
    stack = []
    for f in range(frames):
        noisy = base * 0.9 + 0.1 * rng.random((rows, cols)) * ((f + 1) / frames)
        stack.append(noisy)
    unit = np.clip(np.stack(stack), 0, 1)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    values = np.rint(low + unit * (high - low)).astype(np.int64)
    values.flat[0], values.flat[1] = low, high
    dtype = (np.int8 if signed else np.uint8) if bits <= 8 else (np.int16 if signed else np.uint16)
    out = values.astype(dtype)
    return out if len(shape) == 3 else out[0]


def rgb_image(rows: int = 40, cols: int = 32, frames: int | None = None) -> np.ndarray:
    """Smooth colour ramps (a lossy codec keeps them close)."""
    yy, xx = np.mgrid[0:rows, 0:cols]
    one = np.stack(
        [
            xx * 255 // max(cols - 1, 1),
            yy * 255 // max(rows - 1, 1),
            (xx + yy) * 127 // (rows + cols),
        ],
        axis=-1,
    ).astype(np.uint8)
    if frames is None:
        return one
    return np.stack([np.roll(one, f * 3, axis=1) for f in range(frames)])


def write(tmp_path: Path, name: str, pixels: np.ndarray, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    kwargs.setdefault("phi", FAKE_PHI)
    return write_dicom(tmp_path / name, pixels, **kwargs)


def replace_pixel_stream(path: Path, out: Path, fragment: bytes) -> Path:
    """Copy an encapsulated file with its compressed frame replaced by ``fragment``."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([fragment])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(out, enforce_file_format=True)
    return out
