"""Read DICOM pixel data with the right semantics, the fastest decoder, and typed errors.

What a model sees must not depend on how a hospital's PACS happened to store an image, so the
reader applies the standard's pipeline in order: decode (per transfer syntax, fastest installed
plugin first, falling back to the others), Modality LUT (rescale slope/intercept or LUT),
then, for display, the VOI transform (VOI LUT, else window center/width, else a robust
percentile window) and MONOCHROME1 inversion. Colour (RGB, YBR_*, PALETTE COLOR) becomes RGB.

Every failure is an :class:`~fedmsk.data.errors.ImageReadError` subclass naming the file and
the cause. The VOI step is separate (:func:`apply_voi`) so callers can resize first, which is
several times cheaper on large radiographs and gives the same result.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmsk.data.errors import (
    CorruptPixelDataError,
    EmptyImageError,
    ImageReadError,
    NoPixelDataError,
    NotDicomError,
    TruncatedFileError,
    UnreadableImageError,
    UnsupportedTransferSyntaxError,
)

PERCENTILE_WINDOW = (0.5, 99.5)
"""Percentiles that bound the display window when a file carries no VOI information."""

_PERCENTILE_SAMPLE_PIXELS = 1 << 18

# Decoder plugins in order of preference per transfer syntax (measured on the project's
# machines: see NOTES-platform.md and simulations/bench_decode.py); later ones are fallbacks.
_RLE = ("pylibjpeg", "pydicom", "gdcm")
_JPEG_LS = ("pyjpegls", "gdcm", "pylibjpeg")
_JPEG_LOSSY = ("pylibjpeg", "pillow", "gdcm")
_JPEG_LOSSLESS = ("gdcm", "pylibjpeg")
_JPEG_2000 = ("pylibjpeg", "gdcm", "pillow")
PLUGIN_ORDER: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.5": _RLE,
    "1.2.840.10008.1.2.4.80": _JPEG_LS,
    "1.2.840.10008.1.2.4.81": _JPEG_LS,
    "1.2.840.10008.1.2.4.50": _JPEG_LOSSY,
    "1.2.840.10008.1.2.4.51": _JPEG_LOSSY,
    "1.2.840.10008.1.2.4.57": _JPEG_LOSSLESS,
    "1.2.840.10008.1.2.4.70": _JPEG_LOSSLESS,
    "1.2.840.10008.1.2.4.90": _JPEG_2000,
    "1.2.840.10008.1.2.4.91": _JPEG_2000,
    "1.2.840.10008.1.2.4.201": _JPEG_2000,
    "1.2.840.10008.1.2.4.202": _JPEG_2000,
    "1.2.840.10008.1.2.4.203": _JPEG_2000,
}

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_GREY = ("MONOCHROME1", "MONOCHROME2")
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


@dataclass(frozen=True)
class DicomMetadata:
    """Technical facts about a DICOM image; holds no patient or study identifier."""

    transfer_syntax: str
    photometric_interpretation: str
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    modality: str
    pixel_spacing: tuple[float, float] | None
    rescale_slope: float
    rescale_intercept: float
    window: tuple[float, float] | None
    voi_lut_function: str
    has_voi_lut: bool


@dataclass(frozen=True)
class VoiTransform:
    """How stored-and-rescaled values become display values in [0, 1].

    ``kind`` is ``voi_lut``, ``window`` (DICOM center/width), ``percentile`` (robust window
    computed from the full-resolution pixels) or ``colour`` (divide by ``width``).
    """

    kind: str
    center: float = 0.0
    width: float = 1.0
    function: str = "LINEAR"
    lut: np.ndarray | None = field(default=None, repr=False)
    lut_first: int = 0
    invert: bool = False


@dataclass(frozen=True)
class DicomPixels:
    """Decoded pixel values after the Modality LUT.

    ``values`` is float32: (rows, cols) grey or (rows, cols, 3) RGB for one frame, with a leading
    frame axis when several frames were asked for. ``photometric`` is what ``values`` hold now:
    MONOCHROME1, MONOCHROME2 or RGB. ``decoder`` names the plugin that decoded the pixel data.
    """

    values: np.ndarray
    photometric: str
    metadata: DicomMetadata
    decoder: str
    frame_indices: tuple[int, ...]
    voi: VoiTransform

    def display(self) -> np.ndarray:
        """Values as the model sees them before resizing: float32 in [0, 1].

        With several frames, a percentile window is computed per frame, as
        :func:`read_dicom` does for the frame a model is given.
        """
        grey_frames = self.values.ndim == 3 and self.photometric != "RGB"
        if not (grey_frames and self.voi.kind == "percentile"):
            return apply_voi(self.values, self.voi)
        return np.stack([apply_voi(f, percentile_voi(f, self.voi.invert)) for f in self.values])


def read_dicom(path: Path | str, frame: str | int = "0") -> DicomPixels:
    """Decode one frame of a DICOM file (``frame``: index, ``first``, ``middle`` or ``last``)."""
    path = Path(path)
    ds = read_dataset(path)
    meta = _metadata(path, ds)
    index = resolve_frame(frame, meta.frames, path)
    raw, decoder = _decode(path, ds, meta, index)
    return _finish(path, ds, meta, raw[np.newaxis], decoder, (index,), squeeze=True)


def read_dicom_frames(path: Path | str) -> DicomPixels:
    """Decode every frame of a DICOM file; ``values`` has a leading frame axis."""
    path = Path(path)
    ds = read_dataset(path)
    meta = _metadata(path, ds)
    raw, decoder = _decode(path, ds, meta, None)
    if meta.frames == 1 or raw.ndim == (2 if meta.samples_per_pixel == 1 else 3):
        raw = raw.reshape((1, *raw.shape))
    indices = tuple(range(meta.frames))
    return _finish(path, ds, meta, raw, decoder, indices, squeeze=False)


def read_metadata(path: Path | str) -> DicomMetadata:
    """Header facts without decoding the pixel data."""
    path = Path(path)
    return _metadata(path, read_dataset(path))


def resolve_frame(frame: str | int, frames: int, path: Path | None = None) -> int:
    """Turn a frame choice into an index; raises ``ValueError`` for a malformed choice."""
    if isinstance(frame, str):
        choice = frame.strip().lower()
        named = {"first": 0, "middle": frames // 2, "last": frames - 1}
        if choice in named:
            return named[choice]
        try:
            index = int(choice)
        except ValueError:
            raise ValueError(
                f"frame must be an index, 'first', 'middle' or 'last', got {frame!r}"
            ) from None
    else:
        index = int(frame)
    if index < 0:
        index += frames
    if not 0 <= index < frames:
        raise ImageReadError(
            path or Path("?"), f"frame {frame} requested but the file has {frames} frame(s)"
        )
    return index


def read_dataset(path: Path) -> Any:
    """Parse a file's header and data elements, mapping every failure to a typed error."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_readable(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        ds = _read_without_preamble(path)
    except (EOFError, OSError) as exc:
        raise _truncated_or_unreadable(path, exc) from None
    except Exception as exc:  # pydicom raises many types for damaged headers
        raise _truncated_or_corrupt(path, exc) from None
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise _missing_pixels(path, ds)
    return ds


def _missing_pixels(path: Path, ds: Any) -> ImageReadError:
    """Tell a truncated image from an object that never had pixels (pydicom stops quietly)."""
    with path.open("rb") as handle:
        content = handle.read()
    meta = getattr(ds, "file_meta", None) or {}
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or ""
    # An image class (or no class at all: the header was cut) means pixels were expected.
    expected = not sop_class or "Image" in _uid_name(sop_class)
    if _PIXEL_DATA_TAG in content[128:] or "Rows" in ds or expected:
        return TruncatedFileError(path, "file ends before the end of its pixel data (truncated)")
    return NoPixelDataError(path, "DICOM file has no pixel data (not an image object)")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UnreadableImageError(path, "file not found")
    if not path.is_file():
        raise UnreadableImageError(path, "not a regular file")
    if not os.access(path, os.R_OK):
        raise UnreadableImageError(path, "permission denied")
    if path.stat().st_size == 0:
        raise TruncatedFileError(path, "file is empty (0 bytes)")


def _read_without_preamble(path: Path) -> Any:
    """Accept files written without the 128-byte preamble, as some old modalities do."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
        plausible = any(k in ds for k in (*_PIXEL_KEYWORDS, "SOPClassUID", "Rows", "Modality"))
    except Exception:
        plausible = False
    if not plausible and _only_preamble(path):
        raise TruncatedFileError(path, "file ends inside the DICOM preamble (truncated)")
    if not plausible:
        raise NotDicomError(path, "not a DICOM file (no DICM marker and no DICOM data elements)")
    return ds


def _uid_name(value: Any) -> str:
    from pydicom.uid import UID

    try:
        return UID(str(value)).name
    except Exception:
        return ""


def _only_preamble(path: Path) -> bool:
    """A file no longer than the 128-byte preamble + 'DICM', holding only that prefix."""
    with path.open("rb") as handle:
        head = handle.read(133)
    if len(head) > 132:
        return False
    return not head[:128].strip(b"\x00") and b"DICM".startswith(head[128:])


def _truncated_or_unreadable(path: Path, exc: Exception) -> ImageReadError:
    if isinstance(exc, EOFError):
        return TruncatedFileError(path, "file ends inside the DICOM header (truncated)")
    return UnreadableImageError(path, f"cannot read file ({exc.__class__.__name__})")


def _truncated_or_corrupt(path: Path, exc: Exception) -> ImageReadError:
    text = str(exc).lower()
    if any(word in text for word in ("eof", "end of file", "bytes remaining", "truncat")):
        return TruncatedFileError(path, "file ends inside the DICOM data (truncated)")
    return CorruptPixelDataError(path, f"damaged DICOM header ({_short(exc)})")


def _metadata(path: Path, ds: Any) -> DicomMetadata:
    if "PixelData" in ds:
        for keyword in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
            if ds.get(keyword) is None or ds.get(keyword) == "":
                raise CorruptPixelDataError(path, f"pixel data without required {keyword}")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    frames = _frame_count(ds)
    if rows == 0 or cols == 0 or frames == 0:
        raise EmptyImageError(
            path, f"zero-size image ({rows} rows, {cols} columns, {frames} frames)"
        )
    window = _first_window(ds)
    return DicomMetadata(
        transfer_syntax=str(_transfer_syntax(path, ds)),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "")).strip().upper(),
        rows=rows,
        columns=cols,
        frames=frames,
        samples_per_pixel=int(ds.get("SamplesPerPixel") or 1),
        bits_allocated=int(ds.get("BitsAllocated") or 0),
        bits_stored=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
        pixel_representation=int(ds.get("PixelRepresentation") or 0),
        modality=str(ds.get("Modality", "")),
        pixel_spacing=_pixel_spacing(ds),
        rescale_slope=_float(ds.get("RescaleSlope"), 1.0),
        rescale_intercept=_float(ds.get("RescaleIntercept"), 0.0),
        window=window,
        voi_lut_function=str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper(),
        has_voi_lut=bool(ds.get("VOILUTSequence")),
    )


def _frame_count(ds: Any) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1


def _transfer_syntax(path: Path, ds: Any) -> str:
    """The file's transfer syntax; inferred from the encoding when the meta lacks it."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    if "PixelData" in ds and ds["PixelData"].is_undefined_length:
        raise CorruptPixelDataError(path, "compressed pixel data but no transfer syntax in header")
    implicit, little = getattr(ds, "original_encoding", (True, True))
    guess = _IMPLICIT_LE if implicit else (_EXPLICIT_LE if little else _EXPLICIT_BE)
    ds.file_meta = _ensure_meta(ds)
    ds.file_meta.TransferSyntaxUID = guess
    return guess


def _ensure_meta(ds: Any) -> Any:
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    return meta if meta is not None else FileMetaDataset()


def _first_window(ds: Any) -> tuple[float, float] | None:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center in (None, "") or width in (None, ""):
        return None
    center = center[0] if _is_multi(center) else center
    width = width[0] if _is_multi(width) else width
    try:
        c, w = float(center), float(width)
    except (TypeError, ValueError):
        return None
    return (c, w) if w > 0 else None


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and _is_multi(value) and len(value) == 2:
            try:
                row, col = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                continue
            if row > 0 and col > 0:
                return row, col
    return None


def _is_multi(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def _float(value: Any, default: float) -> float:
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


# --- decoding -------------------------------------------------------------------------------


def _decode(path: Path, ds: Any, meta: DicomMetadata, index: int | None) -> tuple[np.ndarray, str]:
    """Decode frame ``index`` (all frames if None); return the raw array and the decoder."""
    ts = meta.transfer_syntax
    if ts in (_IMPLICIT_LE, _EXPLICIT_LE, _EXPLICIT_BE, "1.2.840.10008.1.2.1.99"):
        _check_native_length(path, ds, meta)
        return _pixel_array(path, ds, index, ""), "pydicom"
    if "PixelData" in ds and not ds["PixelData"].is_undefined_length:
        raise CorruptPixelDataError(path, f"{_ts_name(ts)} requires encapsulated pixel data")
    plugins = _available_plugins(path, ts)
    failures: list[str] = []
    for plugin in plugins:
        try:
            return _pixel_array(path, ds, index, plugin), _decoder_name(plugin, ts)
        except _PluginFailure as failure:
            failures.append(f"{plugin}: {failure}")
    raise _classify_codec_failure(path, ds, ts, failures)


class _PluginFailure(Exception):
    """One decoder plugin failed; the next one may still succeed."""


def _pixel_array(path: Path, ds: Any, index: int | None, plugin: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pixel_array(ds, index=index, decoding_plugin=plugin, as_rgb=True)
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if not plugin:
            raise _native_failure(path, exc) from None
        raise _PluginFailure(_short(exc)) from None


def _native_failure(path: Path, exc: Exception) -> ImageReadError:
    text = str(exc).lower()
    if "less than expected" in text or "shorter" in text:
        return TruncatedFileError(path, f"pixel data shorter than the header says ({_short(exc)})")
    return CorruptPixelDataError(path, f"cannot decode uncompressed pixel data ({_short(exc)})")


def _check_native_length(path: Path, ds: Any, meta: DicomMetadata) -> None:
    from pydicom.pixels.utils import get_expected_length

    if "PixelData" not in ds:
        return
    try:
        expected = get_expected_length(ds, unit="bytes")
    except Exception:
        return
    actual = len(ds.PixelData)
    if actual < expected:
        raise TruncatedFileError(
            path, f"pixel data holds {actual} of {expected} expected bytes (file truncated?)"
        )


def _available_plugins(path: Path, ts: str) -> tuple[str, ...]:
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            path, f"no decoder exists for transfer syntax {_ts_name(ts)}"
        ) from None
    available = set(decoder.available_plugins)
    preferred = PLUGIN_ORDER.get(ts, ())
    order = [p for p in preferred if p in available] + sorted(available - set(preferred))
    if not order:
        missing = "; ".join(f"{k}: {v}" for k, v in decoder.missing_dependencies.items())
        raise UnsupportedTransferSyntaxError(
            path, f"no installed decoder for {_ts_name(ts)} ({missing or 'none installed'})"
        )
    return tuple(order)


def _classify_codec_failure(path: Path, ds: Any, ts: str, failures: list[str]) -> ImageReadError:
    joined = "; ".join(failures)
    unsupported = ("not supported", "unsupported", "does not support")
    if failures and all(any(w in f.lower() for w in unsupported) for f in failures):
        return UnsupportedTransferSyntaxError(
            path, f"installed decoders cannot handle this {_ts_name(ts)} image ({joined})"
        )
    if _file_looks_truncated(path, ds):
        return TruncatedFileError(path, f"compressed pixel data ends early ({joined})")
    return CorruptPixelDataError(path, f"corrupt {_ts_name(ts)} pixel data ({joined})")


def _file_looks_truncated(path: Path, ds: Any) -> bool:
    """Encapsulated data lacking its sequence delimiter means the file was cut short."""
    try:
        with path.open("rb") as handle:
            handle.seek(-8, os.SEEK_END)
            tail = handle.read(8)
    except OSError:
        return False
    return tail != b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _decoder_name(plugin: str, ts: str) -> str:
    if plugin != "pylibjpeg":
        return plugin
    if ts == "1.2.840.10008.1.2.5":
        return "pylibjpeg-rle"
    if ts in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91") or ts.startswith(
        "1.2.840.10008.1.2.4.20"
    ):
        return "pylibjpeg-openjpeg"
    return "pylibjpeg-libjpeg"


def _ts_name(ts: str) -> str:
    from pydicom.uid import UID

    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


def _short(exc: Exception, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- values and display ---------------------------------------------------------------------


def _finish(
    path: Path,
    ds: Any,
    meta: DicomMetadata,
    raw: np.ndarray,
    decoder: str,
    indices: tuple[int, ...],
    *,
    squeeze: bool,
) -> DicomPixels:
    """Apply the Modality LUT or colour conversion and choose the VOI transform."""
    photometric = meta.photometric_interpretation
    if photometric == "PALETTE COLOR":
        values, scale = _apply_palette(path, ds, raw)
        voi, out_pi = VoiTransform(kind="colour", width=scale), "RGB"
    elif meta.samples_per_pixel == 3 or raw.shape[-1:] == (3,) and photometric not in _GREY:
        values = raw.astype(np.float32)
        scale = float((1 << min(meta.bits_stored or 8, 16)) - 1)
        voi, out_pi = VoiTransform(kind="colour", width=scale), "RGB"
    else:
        values = _modality_lut(path, ds, raw, meta)
        voi = _choose_voi(path, ds, meta, values)
        out_pi = photometric if photometric in _GREY else "MONOCHROME2"
    if squeeze:
        values = values[0]
    return DicomPixels(
        values=np.ascontiguousarray(values, dtype=np.float32),
        photometric=out_pi,
        metadata=meta,
        decoder=decoder,
        frame_indices=indices,
        voi=voi,
    )


def _modality_lut(path: Path, ds: Any, raw: np.ndarray, meta: DicomMetadata) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        try:
            return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        except Exception as exc:
            raise CorruptPixelDataError(path, f"invalid Modality LUT ({_short(exc)})") from None
    values = raw.astype(np.float32)
    if meta.rescale_slope != 1.0:
        values *= np.float32(meta.rescale_slope)
    if meta.rescale_intercept != 0.0:
        values += np.float32(meta.rescale_intercept)
    return values


def _apply_palette(path: Path, ds: Any, raw: np.ndarray) -> tuple[np.ndarray, float]:
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(raw, ds)
    except Exception as exc:
        raise CorruptPixelDataError(path, f"invalid palette colour LUT ({_short(exc)})") from None
    scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
    return rgb.astype(np.float32), scale


def _choose_voi(path: Path, ds: Any, meta: DicomMetadata, values: np.ndarray) -> VoiTransform:
    invert = meta.photometric_interpretation == "MONOCHROME1"
    if meta.has_voi_lut:
        lut = _voi_lut(path, ds)
        if lut is not None:
            return VoiTransform(kind="voi_lut", lut=lut[0], lut_first=lut[1], invert=invert)
    if meta.window is not None:
        center, width = meta.window
        function = meta.voi_lut_function
        return VoiTransform("window", center, width, function=function, invert=invert)
    return percentile_voi(values, invert)


def percentile_voi(values: np.ndarray, invert: bool = False) -> VoiTransform:
    """A LINEAR_EXACT window spanning the robust range of ``values``."""
    low, high = robust_range(values)
    return VoiTransform(
        kind="percentile",
        center=(low + high) / 2,
        width=max(high - low, 0.0),
        function="LINEAR_EXACT",
        invert=invert,
    )


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles, from a strided sample of very large images."""
    flat = values.reshape(-1)
    if flat.size > _PERCENTILE_SAMPLE_PIXELS:
        flat = flat[:: flat.size // _PERCENTILE_SAMPLE_PIXELS + 1]
    low, high = np.percentile(flat, PERCENTILE_WINDOW)
    return float(low), float(high)


def _voi_lut(path: Path, ds: Any) -> tuple[np.ndarray, int] | None:
    """The first VOI LUT as (output scaled to [0, 1], first mapped input value)."""
    item = ds.VOILUTSequence[0]
    try:
        count, first, bits = (int(v) for v in item.LUTDescriptor)
        data = item.LUTData
        if isinstance(data, bytes):
            lut = np.frombuffer(data, dtype=_lut_word_dtype(ds, data, count, bits))
            lut = lut.astype(np.float32)
        else:
            lut = np.asarray(data if _is_multi(data) else [data], dtype=np.float32)
    except Exception as exc:
        raise CorruptPixelDataError(path, f"invalid VOI LUT ({_short(exc)})") from None
    if lut.size == 0:
        return None
    if first < 0 and ds.get("PixelRepresentation", 0) == 0:
        first &= 0xFFFF  # descriptor stored as US though meant unsigned
    low, high = float(lut.min()), float(lut.max())
    # Scale by the LUT's own output range: vendors often declare 16 bits and fill 12.
    scaled = (lut - low) / (high - low) if high > low else np.zeros_like(lut)
    return scaled.astype(np.float32), first


def _lut_word_dtype(ds: Any, data: bytes, count: int, bits: int) -> str:
    """LUT Data as OW holds 16-bit words, except 8-bit entries packed one per byte."""
    if bits <= 8 and len(data) == (count or 65536):
        return "u1"
    big = str(ds.file_meta.get("TransferSyntaxUID", "")) == _EXPLICIT_BE
    return ">u2" if big else "<u2"


def apply_voi(values: np.ndarray, voi: VoiTransform) -> np.ndarray:
    """Map Modality-LUT values (any shape) to float32 display values in [0, 1]."""
    values = np.asarray(values, dtype=np.float32)
    if voi.kind == "colour":
        out = values / np.float32(voi.width or 1.0)
    elif voi.kind == "voi_lut" and voi.lut is not None:
        index = np.clip(np.rint(values) - voi.lut_first, 0, voi.lut.size - 1).astype(np.intp)
        out = voi.lut[index]
    else:
        out = _window(values, voi.center, voi.width, voi.function)
    out = np.clip(out, 0.0, 1.0, out=np.asarray(out, dtype=np.float32))
    if voi.invert:
        out = np.subtract(np.float32(1.0), out, out=out)
    return out


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 window functions, output scaled to [0, 1]."""
    if width <= 0:
        return np.zeros_like(values)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width, dtype=np.float32))
    if function == "LINEAR_EXACT":
        return (values - np.float32(center)) / np.float32(width) + np.float32(0.5)
    if width <= 1:
        return (values > center - 0.5).astype(np.float32)
    return (values - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5)
