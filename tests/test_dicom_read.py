"""DICOM writing and reading: pixel semantics per photometric, bit depth, codec, and errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_cases import (
    EXPECTED_DECODER,
    FAKE_PHI,
    LOSSLESS_SYNTAXES,
    grey_image,
    replace_pixel_stream,
    require_encoder,
    rgb_image,
    write,
)
from pydicom import uid
from pydicom.pixels import convert_color_space

from fedmsk.data.dicom import apply_voi, read_dicom, read_dicom_frames, read_metadata
from fedmsk.data.dicom_write import available_encode_syntaxes, encode_support, write_dicom
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

# --- the writer -----------------------------------------------------------------------------


def test_writer_makes_a_standard_file_with_the_phi(tmp_path: Path) -> None:
    path = write(tmp_path, "a.dcm", grey_image(), pixel_spacing=(0.143, 0.15))
    with path.open("rb") as handle:
        assert handle.read(132)[128:] == b"DICM"
    ds = pydicom.dcmread(path)  # no force: a conforming Part 10 file
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    assert str(ds.PatientName) == FAKE_PHI.patient_name
    assert ds.PatientID == FAKE_PHI.patient_id
    assert ds.InstitutionName == FAKE_PHI.institution_name
    assert ds.StudyInstanceUID == FAKE_PHI.study_instance_uid
    assert [float(v) for v in ds.PixelSpacing] == [0.143, 0.15]


def test_writer_rejects_values_outside_bits_stored(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit"):
        write_dicom(tmp_path / "x.dcm", np.full((4, 4), 4096, np.uint16), bits_stored=12)
    with pytest.raises(ValueError, match="integer"):
        write_dicom(tmp_path / "x.dcm", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="32 rows"):
        write_dicom(tmp_path / "x.dcm", np.zeros((16, 40), np.uint16), transfer_syntax=uid.JPEG2000)


def test_encode_support_explains_what_cannot_be_written() -> None:
    assert encode_support(uid.ExplicitVRLittleEndian) is None
    assert uid.ExplicitVRLittleEndian in available_encode_syntaxes()
    reason = encode_support("1.2.840.10008.1.2.4.100")  # MPEG2 video
    assert reason is not None and "not supported" in reason


# --- grey pixels: bit depths, sign, Modality LUT ---------------------------------------------


@pytest.mark.parametrize(
    ("bits", "signed"), [(8, False), (12, False), (16, False), (12, True), (16, True), (8, True)]
)
def test_grey_values_are_bit_exact(tmp_path: Path, bits: int, signed: bool) -> None:
    pixels = grey_image(bits=bits, signed=signed)
    path = write(tmp_path, "g.dcm", pixels, bits_stored=bits, signed=signed)
    decoded = read_dicom(path)
    assert decoded.values.dtype == np.float32
    np.testing.assert_array_equal(decoded.values, pixels.astype(np.float32))
    meta = decoded.metadata
    assert (meta.bits_stored, meta.pixel_representation) == (bits, int(signed))
    assert meta.bits_allocated == (8 if bits <= 8 else 16)
    assert decoded.photometric == "MONOCHROME2"
    display = decoded.display()
    assert display.dtype == np.float32 and display.min() >= 0 and display.max() <= 1


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    pixels = grey_image(bits=12)
    path = write(tmp_path, "r.dcm", pixels, rescale=(0.5, -1024.0))
    decoded = read_dicom(path)
    np.testing.assert_allclose(decoded.values, pixels * 0.5 - 1024.0, rtol=0, atol=1e-4)
    assert decoded.metadata.rescale_slope == 0.5


def test_window_center_width_follows_the_standard(tmp_path: Path) -> None:
    pixels = np.array([[0, 899, 1000, 1100, 1500, 4095]], dtype=np.uint16)
    path = write(tmp_path, "w.dcm", pixels, window=(1000.0, 201.0))
    decoded = read_dicom(path)
    assert decoded.voi.kind == "window"
    display = decoded.display()[0]
    assert display[0] == 0 and display[1] == 0
    assert display[2] == pytest.approx(0.5 + 0.5 / 200, abs=1e-6)  # (x - (c - .5)) / (w - 1) + .5
    assert display[4] == 1 and display[5] == 1


def test_window_applies_after_rescale(tmp_path: Path) -> None:
    pixels = np.array([[0, 1000, 2000]], dtype=np.uint16)
    path = write(tmp_path, "wr.dcm", pixels, rescale=(1.0, -1000.0), window=(0.0, 1001.0))
    display = read_dicom(path).display()[0]
    np.testing.assert_allclose(display, [0.0, 0.5005, 1.0], atol=1e-3)


def test_voi_lut_takes_precedence_over_window(tmp_path: Path) -> None:
    pixels = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.uint16)
    lut = np.array([0, 10, 20, 40, 80, 160, 320, 640], dtype=np.uint16)
    path = write(tmp_path, "v.dcm", pixels, bits_stored=12, voi_lut=lut, window=(2, 2))
    decoded = read_dicom(path)
    assert decoded.voi.kind == "voi_lut"
    np.testing.assert_allclose(decoded.display(), (lut / 640.0)[pixels], atol=1e-6)


def test_without_voi_a_robust_percentile_window_is_used(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = rng.integers(1000, 3000, (64, 64)).astype(np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 4095  # outliers must not set the window
    decoded = read_dicom(write(tmp_path, "p.dcm", pixels))
    assert decoded.voi.kind == "percentile"
    display = decoded.display()
    low, high = np.percentile(pixels, [0.5, 99.5])
    assert np.mean(display == 0) == pytest.approx(np.mean(pixels <= low), abs=0.002)
    assert np.mean(display == 1) == pytest.approx(np.mean(pixels >= high), abs=0.002)
    mid = (pixels > low + 50) & (pixels < high - 50)
    np.testing.assert_allclose(display[mid], (pixels[mid] - low) / (high - low), atol=1e-5)


def test_monochrome1_is_inverted_for_display(tmp_path: Path) -> None:
    pixels = grey_image(bits=12)
    mono2 = read_dicom(write(tmp_path, "m2.dcm", pixels, window=(2048, 4096)))
    mono1 = read_dicom(
        write(tmp_path, "m1.dcm", pixels, window=(2048, 4096), photometric="MONOCHROME1")
    )
    assert mono1.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(mono1.values, mono2.values)  # values keep their meaning
    np.testing.assert_allclose(mono1.display(), 1 - mono2.display(), atol=1e-6)
    pixel_max = np.unravel_index(np.argmax(pixels), pixels.shape)
    assert mono1.display()[pixel_max] == 0  # the highest value is black in MONOCHROME1


# --- colour ---------------------------------------------------------------------------------


def test_rgb_is_bit_exact(tmp_path: Path) -> None:
    pixels = rgb_image()
    decoded = read_dicom(write(tmp_path, "rgb.dcm", pixels, photometric="RGB", bits_stored=8))
    assert decoded.photometric == "RGB" and decoded.values.shape == (*pixels.shape[:2], 3)
    np.testing.assert_array_equal(decoded.values, pixels)
    np.testing.assert_allclose(decoded.display(), pixels / 255.0, atol=1e-6)


def test_ybr_full_is_converted_to_rgb(tmp_path: Path) -> None:
    pixels = rgb_image()
    path = write(tmp_path, "ybr.dcm", pixels, photometric="YBR_FULL", bits_stored=8)
    stored = pydicom.dcmread(path)
    assert stored.PhotometricInterpretation == "YBR_FULL"
    ybr = convert_color_space(pixels, "RGB", "YBR_FULL")
    assert np.abs(ybr.astype(int) - pixels).max() > 20  # the file really holds YBR
    decoded = read_dicom(path)
    assert decoded.photometric == "RGB"
    assert np.abs(decoded.values - pixels).max() <= 3


def test_palette_colour_is_looked_up(tmp_path: Path) -> None:
    indices = (grey_image(bits=8) % 16).astype(np.uint8)
    palette = np.stack(
        [np.arange(256) * 256, (255 - np.arange(256)) * 256, np.full(256, 4096)], axis=1
    ).astype(np.uint16)
    path = write(tmp_path, "pal.dcm", indices, photometric="PALETTE COLOR", bits_stored=8,
                 palette=palette)  # fmt: skip
    decoded = read_dicom(path)
    assert decoded.photometric == "RGB"
    np.testing.assert_array_equal(decoded.values, palette[indices].astype(np.float32))
    np.testing.assert_allclose(decoded.display(), palette[indices] / 65535.0, atol=1e-6)


# --- multi-frame ----------------------------------------------------------------------------


def test_frames_are_chosen_by_index_or_name(tmp_path: Path) -> None:
    pixels = grey_image((5, 16, 12), bits=12)
    path = write(tmp_path, "mf.dcm", pixels, modality="US")
    for choice, index in [("0", 0), ("first", 0), ("middle", 2), ("last", 4), ("3", 3), (-1, 4)]:
        decoded = read_dicom(path, choice)
        assert decoded.frame_indices == (index,)
        np.testing.assert_array_equal(decoded.values, pixels[index])
    every = read_dicom_frames(path)
    assert every.values.shape == (5, 16, 12)
    np.testing.assert_array_equal(every.values, pixels)
    assert read_metadata(path).frames == 5


def test_multiframe_colour(tmp_path: Path) -> None:
    pixels = rgb_image(frames=3)
    path = write(tmp_path, "mfc.dcm", pixels, photometric="RGB", bits_stored=8, modality="US")
    assert read_dicom_frames(path).values.shape == (3, *pixels.shape[1:])
    np.testing.assert_array_equal(read_dicom(path, "last").values, pixels[2])


def test_bad_frame_choices(tmp_path: Path) -> None:
    path = write(tmp_path, "one.dcm", grey_image())
    with pytest.raises(ImageReadError, match="1 frame"):
        read_dicom(path, "3")
    with pytest.raises(ValueError, match="first"):
        read_dicom(path, "second")


# --- transfer syntaxes ----------------------------------------------------------------------


@pytest.mark.parametrize("ts", LOSSLESS_SYNTAXES, ids=lambda t: uid.UID(t).name[:24])
def test_lossless_syntaxes_are_bit_exact(tmp_path: Path, ts: str) -> None:
    require_encoder(ts)
    grey = grey_image(bits=12)
    path = write(tmp_path, "g.dcm", grey, transfer_syntax=ts, rescale=(1.0, -100.0))
    decoded = read_dicom(path)
    assert decoded.metadata.transfer_syntax == ts
    np.testing.assert_array_equal(decoded.values, grey.astype(np.float32) - 100.0)
    if ts in EXPECTED_DECODER:
        assert decoded.decoder == EXPECTED_DECODER[ts]
    signed = grey_image(bits=16, signed=True, seed=3)
    path = write(tmp_path, "s.dcm", signed, bits_stored=16, signed=True, transfer_syntax=ts)
    np.testing.assert_array_equal(read_dicom(path).values, signed.astype(np.float32))
    colour = rgb_image()
    path = write(tmp_path, "c.dcm", colour, photometric="RGB", bits_stored=8, transfer_syntax=ts)
    np.testing.assert_array_equal(read_dicom(path).values, colour)


@pytest.mark.parametrize("ts", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_compressed_multiframe(tmp_path: Path, ts: str) -> None:
    require_encoder(ts)
    pixels = grey_image((3, 40, 36), bits=10)  # J2K's 6 resolutions need >= 32 px
    path = write(tmp_path, "m.dcm", pixels, bits_stored=10, transfer_syntax=ts, modality="US")
    np.testing.assert_array_equal(read_dicom(path, "middle").values, pixels[1])
    np.testing.assert_array_equal(read_dicom_frames(path).values, pixels)


@pytest.mark.parametrize(
    ("ts", "tolerance"),
    [(uid.JPEGLSNearLossless, 2), (uid.JPEG2000, 200)],
    ids=["jpegls-near", "j2k-lossy"],
)
def test_lossy_syntaxes_stay_close(tmp_path: Path, ts: str, tolerance: int) -> None:
    require_encoder(ts)
    yy, xx = np.mgrid[0:64, 0:64]
    pixels = (2000 + 1500 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint16)
    decoded = read_dicom(write(tmp_path, "l.dcm", pixels, transfer_syntax=ts))
    error = np.abs(decoded.values - pixels)
    assert error.max() <= tolerance and error.mean() < 0.03 * 4095
    assert np.corrcoef(decoded.values.ravel(), pixels.ravel())[0, 1] > 0.99
    assert decoded.decoder == EXPECTED_DECODER[ts]


def test_jpeg_baseline_ybr_422_like_an_ultrasound(tmp_path: Path) -> None:
    ts = uid.JPEGBaseline8Bit
    require_encoder(ts)
    pixels = rgb_image(48, 64)
    path = write(
        tmp_path, "us.dcm", pixels, photometric="YBR_FULL_422", bits_stored=8,
        transfer_syntax=ts, modality="US",
    )  # fmt: skip
    assert pydicom.dcmread(path).PhotometricInterpretation == "YBR_FULL_422"
    decoded = read_dicom(path)
    assert decoded.photometric == "RGB"
    assert np.abs(decoded.values - pixels).mean() < 3
    grey = grey_image(bits=8)
    decoded = read_dicom(write(tmp_path, "g8.dcm", grey, bits_stored=8, transfer_syntax=ts))
    assert np.abs(decoded.values - grey).mean() < 4


# --- errors ---------------------------------------------------------------------------------


def _expect(error: type[ImageReadError], path: Path, *words: str) -> ImageReadError:
    with pytest.raises(error) as info:
        read_dicom(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.path == path
    for word in words:
        assert word in str(info.value).lower()
    return info.value


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_bytes(b"this is a text file, not an image\n" * 20)
    _expect(NotDicomError, path, "not a dicom")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    _expect(UnreadableImageError, tmp_path / "absent.dcm", "not found")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    _expect(TruncatedFileError, empty, "empty")


@pytest.mark.parametrize("ts", [uid.ExplicitVRLittleEndian, uid.RLELossless, uid.JPEGLSLossless])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_files(tmp_path: Path, ts: str, fraction: float) -> None:
    require_encoder(ts)
    full = write(tmp_path, "full.dcm", grey_image((64, 48)), transfer_syntax=ts)
    data = full.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * fraction)])
    _expect(TruncatedFileError, cut, "truncated")


def test_no_pixel_data(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: never has pixels
    ds.SOPInstanceUID = uid.generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "SR"
    path = tmp_path / "report.dcm"
    ds.save_as(path, enforce_file_format=True)
    _expect(NoPixelDataError, path, "no pixel data")


@pytest.mark.parametrize("ts", [uid.RLELossless, uid.JPEGLSLossless, uid.JPEG2000Lossless])
def test_corrupt_compressed_stream(tmp_path: Path, ts: str) -> None:
    require_encoder(ts)
    good = write(tmp_path, "good.dcm", grey_image((32, 32)), transfer_syntax=ts)
    garbage = bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8))
    bad = replace_pixel_stream(good, tmp_path / "bad.dcm", garbage)
    error = _expect(CorruptPixelDataError, bad, "corrupt")
    assert uid.UID(ts).name in error.cause


def test_zero_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "z.dcm", grey_image())
    ds = pydicom.dcmread(path)
    ds.Rows = 0
    ds.save_as(path)
    _expect(EmptyImageError, path, "zero-size")


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    good = write(tmp_path, "good.dcm", grey_image(), transfer_syntax=uid.RLELossless)
    bad = replace_pixel_stream(good, tmp_path / "mpeg.dcm", b"\x00\x00\x01\xb3" + bytes(60))
    ds = pydicom.dcmread(bad)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile
    ds.save_as(bad, enforce_file_format=True)
    _expect(UnsupportedTransferSyntaxError, bad, "mpeg2")


def test_errors_survive_pickling(tmp_path: Path) -> None:
    error = TruncatedFileError(tmp_path / "x.dcm", "cut short")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TruncatedFileError and str(copy) == str(error)
    assert isinstance(copy, ImageReadError)


# --- real files shipped with pydicom's test data ---------------------------------------------


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"pydicom test file {name} is not installed (pydicom-data)")
    return Path(found)


def test_real_cr_monochrome1_uncompressed_equals_j2k() -> None:
    plain = read_dicom(_testdata("RG1_UNCR.dcm"))
    j2k = read_dicom(_testdata("RG1_J2KR.dcm"))
    assert plain.photometric == "MONOCHROME1" and plain.metadata.modality == "CR"
    np.testing.assert_array_equal(plain.values, j2k.values)
    display = plain.display()
    dense = plain.values > np.percentile(plain.values, 90)
    assert display[dense].mean() < display[~dense].mean()  # high values shown dark


def test_real_ultrasound_rgb_palette_and_jpeg() -> None:
    rgb = read_dicom(_testdata("US1_UNCR.dcm"))
    j2k = read_dicom(_testdata("US1_J2KR.dcm"))  # YBR_RCT: reversible colour transform
    assert rgb.values.shape[-1] == 3
    np.testing.assert_array_equal(rgb.values, j2k.values)
    palette = read_dicom(_testdata("OBXXXX1A.dcm"))
    assert palette.photometric == "RGB" and palette.values.shape[-1] == 3
    rle = read_dicom(_testdata("OBXXXX1A_rle.dcm"))
    np.testing.assert_array_equal(palette.values, rle.values)
    movie = read_dicom(_testdata("color3d_jpeg_baseline.dcm"), "middle")
    assert movie.frame_indices == (movie.metadata.frames // 2,)
    assert movie.photometric == "RGB" and 0 <= movie.display().min() <= movie.display().max() <= 1


def test_display_of_all_frames_uses_a_window_per_frame(tmp_path: Path) -> None:
    pixels = np.stack([grey_image(bits=12), grey_image(bits=12) // 4]).astype(np.uint16)
    path = write(tmp_path, "two.dcm", pixels)
    every = read_dicom_frames(path).display()
    for index in range(2):
        np.testing.assert_allclose(every[index], read_dicom(path, str(index)).display(), atol=1e-6)


def test_apply_voi_commutes_with_resizing_for_linear_windows(tmp_path: Path) -> None:
    decoded = read_dicom(write(tmp_path, "a.dcm", grey_image((64, 64)), window=(2000, 3000)))
    blocks = decoded.values.reshape(32, 2, 32, 2)
    pooled = blocks.mean(axis=(1, 3))
    direct = apply_voi(pooled, decoded.voi)
    via_display = decoded.display().reshape(32, 2, 32, 2).mean(axis=(1, 3))
    inside = (blocks.min(axis=(1, 3)) > 600) & (blocks.max(axis=(1, 3)) < 3400)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(direct[inside], via_display[inside], atol=1e-5)
