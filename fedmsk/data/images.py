"""One entry point for every image a site may hold: DICOM, PNG (8 or 16 bit) or JPEG.

Sites export radiographs in different containers; the model must see the same thing whatever
the container, so each is turned into float32 display values in [0, 1], shape (H, W, C) with
C = 1 (grey) or 3 (RGB). The format is recognised from the file's first bytes, not its name,
because hospital exports often have no or wrong extensions.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmsk.data.errors import (
    EmptyImageError,
    ImageReadError,
    TruncatedFileError,
    UnreadableImageError,
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class LoadedImage:
    """Display-ready pixels (float32 [0, 1], (H, W, C)) and what is known of their geometry.

    ``source_format`` is ``dicom``, ``png`` or ``jpeg`` (or another Pillow format name, lower
    case); ``decoder`` names the DICOM plugin or ``pillow``.
    """

    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None
    source_format: str
    decoder: str = ""


def sniff_format(path: Path) -> str:
    """``dicom``, ``png``, ``jpeg`` or ``other`` from the first bytes (and DICOM suffixes)."""
    try:
        with Path(path).open("rb") as handle:
            head = handle.read(132)
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except OSError as exc:
        raise UnreadableImageError(path, f"cannot read file ({exc.__class__.__name__})") from None
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if Path(path).suffix.lower() in _DICOM_SUFFIXES:
        return "dicom"
    return "other"


def load_image(path: Path | str, frame: str = "0") -> LoadedImage:
    """Read a DICOM, PNG or JPEG file as display values; raises ImageReadError subclasses.

    DICOM: VOI LUT / window / robust percentile window, MONOCHROME1 inverted, colour to RGB;
    ``frame`` picks a frame of a multi-frame object (index, ``first``, ``middle``, ``last``).
    8-bit PNG/JPEG are display values already and are only scaled; 16-bit PNG holds raw
    detector values in practice, so it gets the same robust percentile window as DICOM.
    """
    path = Path(path)
    kind = sniff_format(path)
    if kind == "dicom":
        return _load_dicom(path, frame)
    return _load_pillow(path)


def _load_dicom(path: Path, frame: str) -> LoadedImage:
    from fedmsk.data.dicom import read_dicom

    decoded = read_dicom(path, frame)
    display = decoded.display()
    if display.ndim == 2:
        display = display[:, :, np.newaxis]
    return LoadedImage(
        pixels=np.ascontiguousarray(display, dtype=np.float32),
        pixel_spacing=decoded.metadata.pixel_spacing,
        source_format="dicom",
        decoder=decoded.decoder,
    )


def _load_pillow(path: Path) -> LoadedImage:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                image.load()
                fmt = (image.format or "other").lower()
                image = ImageOps.exif_transpose(image)
                pixels = _pillow_to_display(image)
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not a DICOM, PNG or JPEG image") from None
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise _pillow_failure(path, exc) from None
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise EmptyImageError(path, f"zero-size image ({pixels.shape[0]}x{pixels.shape[1]})")
    return LoadedImage(pixels=pixels, pixel_spacing=None, source_format=fmt, decoder="pillow")


def _pillow_failure(path: Path, exc: Exception) -> ImageReadError:
    text = str(exc).lower()
    if "truncated" in text or "end of file" in text or "eof" in text:
        return TruncatedFileError(path, "image file is truncated")
    return UnreadableImageError(path, f"cannot decode image ({' '.join(str(exc).split())[:160]})")


def _pillow_to_display(image) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Pillow image -> float32 (H, W, C) in [0, 1]."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        if mode == "I" and values.size and values.max() <= 255 and values.min() >= 0:
            return (values / np.float32(255.0))[:, :, np.newaxis]
        return _percentile_display(values)[:, :, np.newaxis]
    if mode in ("1", "L", "LA"):
        grey = np.asarray(image.convert("L"), dtype=np.float32) / np.float32(255.0)
        return grey[:, :, np.newaxis]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    return rgb


def _percentile_display(values: np.ndarray) -> np.ndarray:
    from fedmsk.data.dicom import apply_voi, percentile_voi

    if values.size == 0:
        return values
    return apply_voi(values, percentile_voi(values))


def to_channels(pixels: np.ndarray, in_chans: int) -> np.ndarray:
    """Give (H, W, C) pixels the model's channel count: grey is repeated, RGB becomes luma.

    ITU-R BT.601 luma weights are used for RGB -> grey, the conversion Pillow and most viewers
    apply, so a radiograph exported as RGB matches its grey original.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    channels = pixels.shape[-1]
    if channels == in_chans:
        return pixels
    if channels == 1 and in_chans == 3:
        return np.repeat(pixels, 3, axis=-1)
    if channels == 3 and in_chans == 1:
        grey = pixels.astype(np.float32) @ _LUMA
        return grey[:, :, np.newaxis].astype(pixels.dtype, copy=False)
    raise ValueError(f"cannot convert {channels}-channel pixels to {in_chans} channels")
