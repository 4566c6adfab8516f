"""Technical facts about one image file, safe to paste into a support ticket.

Hospital IT runs ``fedmsk data inspect`` when a file will not load. What it prints is built
only from technical attributes (syntax, geometry, bit depth, decoder), never from patient or
study identifiers, dates, institution or instance UIDs, so its output can leave the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmsk.data.images import sniff_format

FACT_KEYS = (
    "format",
    "transfer_syntax",
    "transfer_syntax_name",
    "photometric_interpretation",
    "rows",
    "columns",
    "frames",
    "samples_per_pixel",
    "bits_allocated",
    "bits_stored",
    "pixel_representation",
    "modality",
    "pixel_spacing",
    "rescale_slope",
    "rescale_intercept",
    "window",
    "has_voi_lut",
    "decoder",
)


@dataclass(frozen=True)
class Inspection:
    """``facts`` (JSON-safe, keys from :data:`FACT_KEYS`) and, when asked, decoded arrays.

    ``values``: after the Modality LUT, (frames, rows, cols[, 3]); ``display``: float32 [0, 1]
    after VOI/windowing and MONOCHROME1 inversion, same shape.
    """

    facts: dict[str, Any]
    values: np.ndarray | None = None
    display: np.ndarray | None = None


def inspect_image(path: Path | str, *, all_frames: bool = False) -> Inspection:
    """Decode ``path`` (frame 0, or every frame when ``all_frames``) and describe it.

    Raises :class:`~fedmsk.data.errors.ImageReadError` subclasses for unreadable files.
    """
    path = Path(path)
    if sniff_format(path) == "dicom":
        return _inspect_dicom(path, all_frames)
    return _inspect_pillow(path)


def _inspect_dicom(path: Path, all_frames: bool) -> Inspection:
    from pydicom.uid import UID

    from fedmsk.data.dicom import read_dicom, read_dicom_frames

    decoded = read_dicom_frames(path) if all_frames else read_dicom(path, "0")
    meta = decoded.metadata
    facts = {
        "format": "dicom",
        "transfer_syntax": meta.transfer_syntax,
        "transfer_syntax_name": UID(meta.transfer_syntax).name,
        "photometric_interpretation": meta.photometric_interpretation,
        "rows": meta.rows,
        "columns": meta.columns,
        "frames": meta.frames,
        "samples_per_pixel": meta.samples_per_pixel,
        "bits_allocated": meta.bits_allocated,
        "bits_stored": meta.bits_stored,
        "pixel_representation": meta.pixel_representation,
        "modality": meta.modality,
        "pixel_spacing": list(meta.pixel_spacing) if meta.pixel_spacing else None,
        "rescale_slope": meta.rescale_slope,
        "rescale_intercept": meta.rescale_intercept,
        "window": list(meta.window) if meta.window else None,
        "has_voi_lut": meta.has_voi_lut,
        "decoder": decoded.decoder,
    }
    if not all_frames:
        return Inspection(facts=facts)
    return Inspection(facts=facts, values=decoded.values, display=decoded.display())


def _inspect_pillow(path: Path) -> Inspection:
    from PIL import Image

    from fedmsk.data.images import load_image

    loaded = load_image(path)
    with Image.open(path) as image:
        mode, fmt = image.mode, (image.format or "").lower()
        raw = np.asarray(image.convert("RGB") if mode not in _GREY_MODES else image)
    bits = 16 if mode.startswith("I;16") else (32 if mode in ("I", "F") else 8)
    colour = loaded.pixels.shape[-1] == 3
    facts = dict.fromkeys(FACT_KEYS)
    facts.update(
        format=fmt,
        photometric_interpretation="RGB" if colour else "MONOCHROME2",
        rows=int(loaded.pixels.shape[0]),
        columns=int(loaded.pixels.shape[1]),
        frames=1,
        samples_per_pixel=3 if colour else 1,
        bits_allocated=bits,
        bits_stored=bits,
        pixel_representation=0,
        has_voi_lut=False,
        decoder="pillow",
    )
    values = raw.astype(np.float32)[np.newaxis]
    display = loaded.pixels if colour else loaded.pixels[:, :, 0]
    return Inspection(facts=facts, values=values, display=display[np.newaxis])


_GREY_MODES = ("1", "L", "I", "I;16", "I;16B", "I;16L", "F")


def format_table(facts: dict[str, Any]) -> str:
    """Facts as aligned ``key  value`` lines for a terminal."""
    width = max(len(k) for k in facts)
    lines = []
    for key in FACT_KEYS:
        if key in facts:
            value = facts[key]
            shown = (
                "-"
                if value is None
                else (", ".join(map(str, value)) if isinstance(value, list) else value)
            )
            lines.append(f"{key.ljust(width)}  {shown}")
    return "\n".join(lines)
