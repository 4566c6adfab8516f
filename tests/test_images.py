"""load_image over DICOM, PNG (8/16 bit) and JPEG; to_channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_cases import grey_image, rgb_image, write
from PIL import Image

from fedmsk.data.errors import (
    EmptyImageError,
    ImageReadError,
    TruncatedFileError,
    UnreadableImageError,
)
from fedmsk.data.images import LoadedImage, load_image, sniff_format, to_channels


def _check(image: LoadedImage, shape: tuple[int, int, int]) -> None:
    assert image.pixels.dtype == np.float32 and image.pixels.shape == shape
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0


def test_dicom_grey_with_spacing(tmp_path: Path) -> None:
    pixels = grey_image((40, 32), bits=12)
    path = write(tmp_path, "a.dcm", pixels, window=(2048, 4096), pixel_spacing=(0.1, 0.2))
    image = load_image(path)
    _check(image, (40, 32, 1))
    assert image.source_format == "dicom" and image.pixel_spacing == (0.1, 0.2)
    expected = np.clip((pixels - 2047.5) / 4095 + 0.5, 0, 1)  # LINEAR window, c=2048 w=4096
    np.testing.assert_allclose(image.pixels[:, :, 0], expected, atol=1e-5)


def test_dicom_monochrome1_and_frames(tmp_path: Path) -> None:
    pixels = grey_image((3, 20, 16), bits=12)
    m1 = write(tmp_path, "m1.dcm", pixels, photometric="MONOCHROME1", window=(2048, 4096))
    m2 = write(tmp_path, "m2.dcm", pixels, window=(2048, 4096))
    for frame in ("0", "middle", "last"):
        a, b = load_image(m1, frame).pixels, load_image(m2, frame).pixels
        np.testing.assert_allclose(a, 1 - b, atol=1e-6)
    assert not np.allclose(load_image(m2, "first").pixels, load_image(m2, "last").pixels)


def test_dicom_colour(tmp_path: Path) -> None:
    pixels = rgb_image()
    image = load_image(write(tmp_path, "c.dcm", pixels, photometric="RGB", bits_stored=8))
    _check(image, (*pixels.shape[:2], 3))
    np.testing.assert_allclose(image.pixels, pixels / 255.0, atol=1e-6)


def test_png_8bit_grey_and_rgb(tmp_path: Path) -> None:
    grey = (np.arange(48 * 40).reshape(48, 40) % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    _check(image, (48, 40, 1))
    assert image.source_format == "png" and image.pixel_spacing is None
    np.testing.assert_allclose(image.pixels[:, :, 0], grey / 255.0, atol=1e-7)
    colour = rgb_image()
    Image.fromarray(colour).save(tmp_path / "c.png")
    np.testing.assert_allclose(load_image(tmp_path / "c.png").pixels, colour / 255.0, atol=1e-7)


def test_png_16bit_gets_a_percentile_window(tmp_path: Path) -> None:
    raw = grey_image((64, 64), bits=12)  # 12-bit values in a 16-bit PNG, as exports do
    Image.fromarray(raw.astype(np.uint16)).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png")
    _check(image, (64, 64, 1))
    assert image.pixels.max() == 1.0  # not raw / 65535, which would be dark
    low, high = np.percentile(raw, [0.5, 99.5])
    mid = (raw > low) & (raw < high)
    np.testing.assert_allclose(
        image.pixels[:, :, 0][mid], (raw[mid] - low) / (high - low), atol=1e-5
    )


def test_jpeg(tmp_path: Path) -> None:
    colour = rgb_image(64, 64)
    Image.fromarray(colour).save(tmp_path / "c.jpg", quality=95)
    image = load_image(tmp_path / "c.jpg")
    _check(image, (64, 64, 3))
    assert image.source_format == "jpeg"
    assert np.abs(image.pixels - colour / 255.0).mean() < 0.02


def test_format_comes_from_content_not_name(tmp_path: Path) -> None:
    grey = np.full((8, 8), 128, np.uint8)
    Image.fromarray(grey).save(tmp_path / "real.png")
    disguised = tmp_path / "looks_like.dcm"
    disguised.write_bytes((tmp_path / "real.png").read_bytes())
    assert sniff_format(disguised) == "png"
    assert load_image(disguised).source_format == "png"
    dicom = write(tmp_path, "a.dcm", grey_image())
    renamed = tmp_path / "scan.png"
    renamed.write_bytes(dicom.read_bytes())
    assert load_image(renamed).source_format == "dicom"


def test_image_errors_are_typed(tmp_path: Path) -> None:
    Image.fromarray(rgb_image(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedFileError, match="cut.png"):
        load_image(cut)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01\x02garbage" * 30)
    with pytest.raises(UnreadableImageError, match="not a DICOM, PNG or JPEG"):
        load_image(junk)
    with pytest.raises(UnreadableImageError, match="not found"):
        load_image(tmp_path / "absent.png")
    with pytest.raises(ImageReadError):
        load_image(tmp_path / "absent.dcm")
    assert issubclass(EmptyImageError, ImageReadError)


def test_to_channels() -> None:
    grey = np.random.default_rng(0).random((5, 4, 1)).astype(np.float32)
    rgb = to_channels(grey, 3)
    assert rgb.shape == (5, 4, 3) and np.array_equal(rgb[:, :, 2], grey[:, :, 0])
    np.testing.assert_allclose(to_channels(rgb, 1), grey, atol=1e-6)  # grey survives a round trip
    colour = np.zeros((2, 2, 3), np.float32)
    colour[..., 1] = 1.0
    np.testing.assert_allclose(to_channels(colour, 1), 0.587, atol=1e-6)
    assert to_channels(grey, 1) is grey
    assert to_channels(grey[:, :, 0], 1).shape == (5, 4, 1)
    with pytest.raises(ValueError, match="channels"):
        to_channels(grey, 4)
