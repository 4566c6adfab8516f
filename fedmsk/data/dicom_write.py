"""Write real, standard-conforming DICOM files from numpy arrays.

The synthetic federation and the tests need DICOM files that exercise every path of the reader:
each photometric interpretation, 8/12/16-bit and signed pixels, multi-frame objects, Modality
and VOI LUTs, and the compressed transfer syntaxes a hospital PACS actually sends. The files
carry fake patient data (:class:`DicomPHI`) so tests can prove that none of it leaves a node.

Encoding routes: uncompressed syntaxes are written by pydicom; RLE, JPEG-LS and JPEG 2000 by
pydicom's encoder plugins; the JPEG family (baseline, extended, lossless process 14), for which
pydicom has no encoder, by GDCM's ``ImageChangeTransferSyntax`` when python-gdcm is installed.
:func:`encode_support` says whether (and why not) a syntax can be written on this machine.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence as DicomSequence

GREY_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422")
PALETTE = "PALETTE COLOR"

NATIVE_SYNTAXES = (
    dicom_uid.ExplicitVRLittleEndian,
    dicom_uid.ImplicitVRLittleEndian,
    dicom_uid.DeflatedExplicitVRLittleEndian,
    dicom_uid.ExplicitVRBigEndian,
)
PYDICOM_ENCODED_SYNTAXES = (
    dicom_uid.RLELossless,
    dicom_uid.JPEGLSLossless,
    dicom_uid.JPEGLSNearLossless,
    dicom_uid.JPEG2000Lossless,
    dicom_uid.JPEG2000,
)
GDCM_ENCODED_SYNTAXES = (
    dicom_uid.JPEGBaseline8Bit,
    dicom_uid.JPEGExtended12Bit,
    dicom_uid.JPEGLossless,
    dicom_uid.JPEGLosslessSV1,
)
SUPPORTED_ENCODE_SYNTAXES: tuple[str, ...] = (
    NATIVE_SYNTAXES + PYDICOM_ENCODED_SYNTAXES + GDCM_ENCODED_SYNTAXES
)
"""Every transfer syntax this module knows how to write (see :func:`encode_support`)."""

LOSSY_SYNTAXES = frozenset(
    {
        dicom_uid.JPEGLSNearLossless,
        dicom_uid.JPEG2000,
        dicom_uid.JPEGBaseline8Bit,
        dicom_uid.JPEGExtended12Bit,
    }
)

_SOP_CLASSES = {
    ("CR", False): "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    ("DX", False): "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage, Presentation
    ("US", False): "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    ("US", True): "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_MULTIFRAME_SC_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
_MULTIFRAME_SC_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
_MULTIFRAME_SC_COLOUR = "1.2.840.10008.5.1.4.1.1.7.4"


@dataclass(frozen=True)
class DicomPHI:
    """Patient and study identifiers written into a file's header.

    The values are fake but realistic, so a test can search every byte that leaves a node for
    them. Empty strings leave an attribute out; UIDs are generated when empty.
    """

    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    sex: str = ""
    study_date: str = ""
    study_time: str = ""
    institution_name: str = ""
    accession_number: str = ""
    referring_physician: str = ""
    study_description: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    body_part: str = ""
    laterality: str = ""
    view_position: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


def encode_support(transfer_syntax: str) -> str | None:
    """Return ``None`` when ``transfer_syntax`` can be written here, else the reason it cannot."""
    ts = dicom_uid.UID(transfer_syntax)
    if ts in NATIVE_SYNTAXES:
        return None
    if ts in PYDICOM_ENCODED_SYNTAXES:
        from pydicom.pixels import get_encoder

        encoder = get_encoder(ts)
        if encoder.is_available:
            return None
        missing = "; ".join(f"{k}: {v}" for k, v in encoder.missing_dependencies.items())
        return f"no pydicom encoder plugin available for {ts.name} ({missing})"
    if ts in GDCM_ENCODED_SYNTAXES:
        try:
            import gdcm  # noqa: F401
        except ImportError:
            return f"{ts.name} needs python-gdcm to encode (pydicom has no encoder)"
        return None
    return f"writing {ts.name or ts} is not supported"


def available_encode_syntaxes() -> tuple[str, ...]:
    """The transfer syntaxes that :func:`write_dicom` can produce on this machine."""
    return tuple(ts for ts in SUPPORTED_ENCODE_SYNTAXES if encode_support(ts) is None)


def write_dicom(
    path: Path | str,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    transfer_syntax: str = dicom_uid.ExplicitVRLittleEndian,
    pixel_spacing: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    phi: DicomPHI | None = None,
    modality: str = "CR",
    voi_lut: np.ndarray | None = None,
    palette: np.ndarray | None = None,
    encode_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``pixels`` as a DICOM file at ``path`` and return the path.

    ``pixels`` is an integer array: (rows, cols) or (frames, rows, cols) for MONOCHROME1/2 and
    PALETTE COLOR (palette indices), (rows, cols, 3) or (frames, rows, cols, 3) for colour.
    Colour pixels are always given as RGB, 8-bit; for YBR_FULL / YBR_FULL_422 they are converted
    on write (YBR_FULL_422 only with a JPEG syntax, as scanners send it; the stream here keeps
    full-resolution chroma, which decoders accept).
    Grey values are the stored values: they must fit ``bits_stored`` (two's complement range
    when ``signed``). ``window`` is (center, width); ``rescale`` is (slope, intercept);
    ``voi_lut`` a 1-D LUT written as a VOI LUT Sequence whose first entry maps the lowest stored
    value; ``palette`` an (N, 3) array of 16-bit RGB entries (a grey ramp when omitted).
    ``encode_options`` go to pydicom's encoder (e.g. ``jls_error``, ``j2k_cr``) or, for GDCM,
    ``quality`` (JPEG baseline/extended, 1-100).
    Raises ``ValueError`` for inconsistent arguments and ``RuntimeError`` naming the syntax when
    it cannot be encoded here (see :func:`encode_support`).
    """
    path = Path(path)
    ts = dicom_uid.UID(transfer_syntax)
    reason = encode_support(ts)
    if reason is not None:
        raise RuntimeError(reason)
    photometric = photometric.upper()
    arr = np.asarray(pixels)
    frames, colour = _check_pixels(arr, photometric, bits_stored, signed)
    ds = _base_dataset(ts, modality, frames, colour, bits_stored)
    _add_image_module(ds, arr, photometric, bits_stored, signed, frames, colour)
    word = ">u2" if ts == dicom_uid.ExplicitVRBigEndian else "<u2"
    _add_geometry_and_luts(ds, pixel_spacing, window, rescale)
    if voi_lut is not None:
        ds.VOILUTSequence = DicomSequence(
            [_voi_lut_item(np.asarray(voi_lut), signed, bits_stored, word)]
        )
    if photometric == PALETTE:
        _add_palette(ds, palette, bits_stored, word)
    _add_phi(ds, phi or DicomPHI())
    stored = _stored_array(arr, photometric, colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ts in GDCM_ENCODED_SYNTAXES:
        _write_with_gdcm(path, ds, stored, ts, dict(encode_options or {}))
    elif ts in PYDICOM_ENCODED_SYNTAXES:
        _write_with_pydicom_encoder(path, ds, stored, ts, dict(encode_options or {}))
    else:
        _write_native(path, ds, stored, ts)
    return path


def _check_pixels(
    arr: np.ndarray, photometric: str, bits_stored: int, signed: bool
) -> tuple[int, bool]:
    """Validate shape, dtype and value range; return (frames, is_colour)."""
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"pixels must be an integer array, got {arr.dtype}")
    colour = photometric in COLOUR_PHOTOMETRICS
    if photometric not in GREY_PHOTOMETRICS + COLOUR_PHOTOMETRICS + (PALETTE,):
        raise ValueError(f"unsupported photometric interpretation {photometric!r}")
    if colour:
        if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
            raise ValueError(
                f"{photometric} pixels must be (rows, cols, 3) or (frames, rows, cols, 3)"
            )
        if bits_stored != 8 or signed:
            raise ValueError(f"{photometric} pixels must be unsigned 8-bit")
        frames = arr.shape[0] if arr.ndim == 4 else 1
    else:
        if arr.ndim not in (2, 3):
            raise ValueError(f"{photometric} pixels must be (rows, cols) or (frames, rows, cols)")
        frames = arr.shape[0] if arr.ndim == 3 else 1
    if not 1 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 1-16, got {bits_stored}")
    if signed and photometric == PALETTE:
        raise ValueError("PALETTE COLOR indices cannot be signed")
    low, high = (
        (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1)
        if signed
        else (
            0,
            (1 << bits_stored) - 1,
        )
    )
    if arr.size and (int(arr.min()) < low or int(arr.max()) > high):
        raise ValueError(
            f"pixel values {int(arr.min())}..{int(arr.max())} do not fit "
            f"{'signed' if signed else 'unsigned'} {bits_stored}-bit ({low}..{high})"
        )
    return frames, colour


def _sop_class(modality: str, frames: int, colour: bool, bits_allocated: int) -> str:
    multi = frames > 1
    known = _SOP_CLASSES.get((modality.upper(), multi))
    if known is not None:
        return known
    if not multi:
        return _SECONDARY_CAPTURE
    if colour:
        return _MULTIFRAME_SC_COLOUR
    return _MULTIFRAME_SC_BYTE if bits_allocated == 8 else _MULTIFRAME_SC_WORD


def _base_dataset(
    ts: dicom_uid.UID, modality: str, frames: int, colour: bool, bits_stored: int
) -> Dataset:
    bits_allocated = 8 if bits_stored <= 8 else 16
    sop_class = _sop_class(modality, frames, colour, bits_allocated)
    sop_instance = dicom_uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = dicom_uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.Modality = modality.upper()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD" if sop_class.startswith(_SECONDARY_CAPTURE) else None
    if ds.ConversionType is None:
        del ds.ConversionType
    return ds


def _add_image_module(
    ds: Dataset,
    arr: np.ndarray,
    photometric: str,
    bits_stored: int,
    signed: bool,
    frames: int,
    colour: bool,
) -> None:
    rows, cols = (arr.shape[-3], arr.shape[-2]) if colour else (arr.shape[-2], arr.shape[-1])
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames > 1:
        ds.NumberOfFrames = frames


def _add_geometry_and_luts(
    ds: Dataset,
    pixel_spacing: tuple[float, float] | None,
    window: tuple[float, float] | None,
    rescale: tuple[float, float] | None,
) -> None:
    if pixel_spacing is not None:
        ds.PixelSpacing = [_ds_number(v) for v in pixel_spacing]
        if ds.Modality in ("CR", "DX"):
            ds.ImagerPixelSpacing = [_ds_number(v) for v in pixel_spacing]
    if rescale is not None:
        ds.RescaleSlope = _ds_number(rescale[0])
        ds.RescaleIntercept = _ds_number(rescale[1])
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = _ds_number(window[0])
        ds.WindowWidth = _ds_number(window[1])
        ds.VOILUTFunction = "LINEAR"


def _voi_lut_item(lut: np.ndarray, signed: bool, bits_stored: int, word: str) -> Dataset:
    if lut.ndim != 1 or lut.size == 0 or not np.issubdtype(lut.dtype, np.integer):
        raise ValueError("voi_lut must be a non-empty 1-D integer array")
    if lut.min() < 0 or lut.max() > 0xFFFF:
        raise ValueError("voi_lut entries must be 0..65535")
    first = -(1 << (bits_stored - 1)) if signed else 0
    entry_bits = 8 if lut.max() < 256 else 16
    item = Dataset()
    item.LUTDescriptor = [lut.size if lut.size < 65536 else 0, first, entry_bits]
    item.LUTData = lut.astype(word).tobytes()
    item["LUTData"].VR = "OW"
    item.LUTExplanation = "fedmsk synthetic VOI LUT"
    return item


def _add_palette(ds: Dataset, palette: np.ndarray | None, bits_stored: int, word: str) -> None:
    entries = 1 << bits_stored
    if palette is None:
        ramp = np.linspace(0, 0xFFFF, entries).astype(np.uint16)
        palette = np.stack([ramp, ramp[::-1], ramp // 2], axis=1)
    palette = np.asarray(palette)
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] == 0:
        raise ValueError("palette must be an (N, 3) array of RGB entries")
    if palette.min() < 0 or palette.max() > 0xFFFF:
        raise ValueError("palette entries must be 0..65535")
    count = palette.shape[0]
    descriptor = [count if count < 65536 else 0, 0, 16]
    for name, channel in zip(("Red", "Green", "Blue"), range(3), strict=True):
        setattr(ds, f"{name}PaletteColorLookupTableDescriptor", descriptor)
        data = palette[:, channel].astype(word).tobytes()
        setattr(ds, f"{name}PaletteColorLookupTableData", data)


def _add_phi(ds: Dataset, phi: DicomPHI) -> None:
    ds.PatientName = phi.patient_name
    ds.PatientID = phi.patient_id
    ds.PatientBirthDate = phi.birth_date
    ds.PatientSex = phi.sex
    ds.StudyDate = phi.study_date
    ds.StudyTime = phi.study_time
    ds.AccessionNumber = phi.accession_number
    ds.ReferringPhysicianName = phi.referring_physician
    ds.StudyID = ""
    ds.StudyInstanceUID = phi.study_instance_uid or dicom_uid.generate_uid()
    ds.SeriesInstanceUID = phi.series_instance_uid or dicom_uid.generate_uid()
    optional = {
        "InstitutionName": phi.institution_name,
        "StudyDescription": phi.study_description,
        "BodyPartExamined": phi.body_part,
        "ImageLaterality": phi.laterality,
        "ViewPosition": phi.view_position,
        "ContentDate": phi.study_date,
        "SeriesDate": phi.study_date,
    }
    for keyword, value in {**optional, **dict(phi.extra)}.items():
        if value:
            setattr(ds, keyword, value)


def _stored_array(arr: np.ndarray, photometric: str, colour: bool) -> np.ndarray:
    """The array as it is stored: YBR converted from RGB, dtype matching Bits Allocated."""
    if colour:
        out = arr.astype(np.uint8)
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            out = convert_color_space(out, "RGB", "YBR_FULL")
        return out
    return arr


def _native_bytes(arr: np.ndarray, ds: Dataset, big_endian: bool) -> bytes:
    signed = ds.PixelRepresentation == 1
    if ds.BitsAllocated == 8:
        dtype = np.int8 if signed else np.uint8
    else:
        dtype = (
            np.dtype(">i2" if signed else ">u2")
            if big_endian
            else (np.dtype("<i2" if signed else "<u2"))
        )
    data = np.ascontiguousarray(arr).astype(dtype).tobytes()
    return data + b"\x00" if len(data) % 2 else data


def _write_native(path: Path, ds: Dataset, arr: np.ndarray, ts: dicom_uid.UID) -> None:
    if ds.PhotometricInterpretation == "YBR_FULL_422":
        raise ValueError("YBR_FULL_422 can only be written with a JPEG transfer syntax here")
    big_endian = ts == dicom_uid.ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = _native_bytes(arr, ds, big_endian)
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    if ts == dicom_uid.ImplicitVRLittleEndian:
        ds["PixelData"].VR = "OW"
    dcmwrite(path, ds, enforce_file_format=True)


def _write_with_pydicom_encoder(
    path: Path, ds: Dataset, arr: np.ndarray, ts: dicom_uid.UID, options: dict[str, Any]
) -> None:
    if ds.PhotometricInterpretation == "YBR_FULL_422":
        raise ValueError("YBR_FULL_422 can only be written with a JPEG transfer syntax here")
    if ts in (dicom_uid.JPEG2000, dicom_uid.JPEG2000Lossless) and min(ds.Rows, ds.Columns) < 32:
        raise ValueError(
            f"{ts.name} needs at least 32 rows and columns here (the encoder's 6 wavelet "
            f"resolutions); got {ds.Rows}x{ds.Columns}"
        )
    if ts == dicom_uid.RLELossless:
        # GDCM's RLE encoder aborts the whole process on some odd 8-bit sizes (e.g. 99x151).
        options.setdefault("encoding_plugin", "pylibjpeg")
    if ts == dicom_uid.JPEGLSNearLossless:
        options.setdefault("jls_error", 2)
    if ts == dicom_uid.JPEG2000 and "j2k_psnr" not in options:
        options.setdefault("j2k_cr", [20])
    ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    ds.compress(ts, arr, generate_instance_uid=False, **options)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    dcmwrite(path, ds, enforce_file_format=True)


def _write_with_gdcm(
    path: Path, ds: Dataset, arr: np.ndarray, ts: dicom_uid.UID, options: dict[str, Any]
) -> None:
    """Write uncompressed with pydicom, then let GDCM transcode to a JPEG syntax."""
    import gdcm

    _check_gdcm_jpeg_limits(ds, ts)
    want_422 = ds.PhotometricInterpretation == "YBR_FULL_422"
    if want_422:
        ds.PhotometricInterpretation = "YBR_FULL"
    with tempfile.TemporaryDirectory(prefix="fedmsk-dcm-") as tmp:
        native = Path(tmp) / "native.dcm"
        _write_native(native, ds, arr, dicom_uid.ExplicitVRLittleEndian)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(native))
        if not reader.Read():
            raise RuntimeError(f"GDCM could not read back the intermediate file for {path}")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(_gdcm_syntax(gdcm, ts)))
        codec = gdcm.JPEGCodec()
        if ts in LOSSY_SYNTAXES:
            codec.SetLossless(False)
            codec.SetQuality(float(options.get("quality", 90)))
        change.SetUserCodec(codec)
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError(f"GDCM could not encode {path} as {ts.name}")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(path))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"GDCM could not write {path}")
    _restore_header(path, ds, ts, "YBR_FULL_422" if want_422 else None)


def _check_gdcm_jpeg_limits(ds: Dataset, ts: dicom_uid.UID) -> None:
    if ts == dicom_uid.JPEGBaseline8Bit and ds.BitsStored > 8:
        raise ValueError("JPEG baseline holds 8-bit samples only")
    if ts == dicom_uid.JPEGExtended12Bit and ds.BitsStored > 8:
        raise ValueError(
            "JPEG extended is written for 8-bit samples only (GDCM's 12-bit lossy streams "
            "declare a precision that conforming decoders reject)"
        )
    if ts in LOSSY_SYNTAXES and ds.PhotometricInterpretation == "RGB":
        raise ValueError(
            f"{ts.name} colour must be written as YBR_FULL_422 or YBR_FULL (what scanners "
            "send); GDCM's RGB lossy JPEG streams decode with wrong colours"
        )
    if ds.PixelRepresentation == 1 and ts in LOSSY_SYNTAXES:
        raise ValueError(f"{ts.name} with signed pixels is not supported here")


def _gdcm_syntax(gdcm: Any, ts: dicom_uid.UID) -> int:
    names = {
        dicom_uid.JPEGBaseline8Bit: "JPEGBaselineProcess1",
        dicom_uid.JPEGExtended12Bit: "JPEGExtendedProcess2_4",
        dicom_uid.JPEGLossless: "JPEGLosslessProcess14",
        dicom_uid.JPEGLosslessSV1: "JPEGLosslessProcess14_1",
    }
    return int(getattr(gdcm.TransferSyntax, names[ts]))


def _restore_header(path: Path, ds: Dataset, ts: dicom_uid.UID, photometric: str | None) -> None:
    """Keep GDCM's compressed stream but our header: GDCM adds attributes (a 1\\1 pixel
    spacing, for one) that would make the file claim what the caller never said."""
    from pydicom import dcmread

    encoded = dcmread(path)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    if ts in LOSSY_SYNTAXES:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    dcmwrite(path, ds, enforce_file_format=True)


def _ds_number(value: float) -> str:
    """Format a number for a DS element (max 16 characters)."""
    text = f"{float(value):.10g}"
    if len(text) > 16:
        text = f"{float(value):.8g}"
    return text
