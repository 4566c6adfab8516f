"""``fedmsk data inspect``: technical facts only, arrays on request, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dicom_cases import PHI_STRINGS, grey_image, rgb_image, write
from pydicom import uid

from fedmsk.cli import main
from fedmsk.data.inspect import FACT_KEYS

REQUIRED = (
    "transfer_syntax",
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
    "decoder",
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["data", "inspect", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_technical_facts_and_no_phi(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = write(
        tmp_path, "wrist.dcm", grey_image(bits=12), transfer_syntax=uid.RLELossless,
        pixel_spacing=(0.15, 0.15), window=(2000, 4000),
    )  # fmt: skip
    code, out, err = _run(capsys, str(path), "--json")
    assert code == 0 and err == ""
    facts = json.loads(out)
    assert set(REQUIRED) <= set(facts) and set(facts) <= set(FACT_KEYS)
    assert facts["transfer_syntax"] == uid.RLELossless
    assert (facts["rows"], facts["columns"], facts["frames"]) == (40, 32, 1)
    assert facts["bits_stored"] == 12 and facts["pixel_spacing"] == [0.15, 0.15]
    assert facts["photometric_interpretation"] == "MONOCHROME2"
    assert facts["decoder"] == "pylibjpeg-rle" and facts["modality"] == "CR"
    import pydicom

    ds = pydicom.dcmread(path)
    forbidden = [*PHI_STRINGS, ds.SOPInstanceUID, ds.SeriesInstanceUID, str(tmp_path)]
    for text in forbidden:
        assert text not in out


def test_table_output_without_phi(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, "a.dcm", grey_image())
    code, out, _ = _run(capsys, str(path))
    assert code == 0
    rows = {line.split()[0]: line.split()[-1] for line in out.strip().splitlines()}
    assert rows["photometric_interpretation"] == "MONOCHROME2"
    assert rows["rows"] == "40" and rows["decoder"] == "pydicom"
    assert not any(text in out for text in PHI_STRINGS)


def test_npy_outputs_for_multiframe_grey(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pixels = grey_image((3, 20, 16), bits=12)
    path = write(tmp_path, "mf.dcm", pixels, rescale=(2.0, -10.0), photometric="MONOCHROME1",
                 modality="US")  # fmt: skip
    values, display = tmp_path / "v.npy", tmp_path / "d.npy"
    code, out, _ = _run(capsys, str(path), "--json", "--npy", str(values),
                        "--display-npy", str(display))  # fmt: skip
    assert code == 0 and json.loads(out)["frames"] == 3
    saved = np.load(values)
    assert saved.dtype == np.float32 and saved.shape == (3, 20, 16)
    np.testing.assert_allclose(saved, pixels * 2.0 - 10.0)
    shown = np.load(display)
    assert shown.dtype == np.float32 and shown.shape == (3, 20, 16)
    assert shown.min() >= 0 and shown.max() <= 1
    from fedmsk.data.images import load_image

    for index in range(3):  # exactly what the model is given for that frame
        np.testing.assert_allclose(shown[index], load_image(path, str(index)).pixels[:, :, 0])
    brightest = np.unravel_index(np.argmax(pixels[0]), pixels[0].shape)
    assert shown[0][brightest] == 0  # MONOCHROME1 inverted


def test_npy_outputs_for_colour(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    pixels = rgb_image()
    path = write(tmp_path, "c.dcm", pixels, photometric="YBR_FULL", bits_stored=8)
    values, display = tmp_path / "v.npy", tmp_path / "d.npy"
    code, _, _ = _run(capsys, str(path), "--npy", str(values), "--display-npy", str(display))
    assert code == 0
    assert np.load(values).shape == (1, *pixels.shape)
    assert np.abs(np.load(display)[0] - pixels / 255.0).max() < 0.015


def test_png_is_inspected_too(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    Image.fromarray(np.zeros((12, 10), np.uint8)).save(tmp_path / "x.png")
    code, out, _ = _run(capsys, str(tmp_path / "x.png"), "--json")
    facts = json.loads(out)
    assert code == 0 and facts["format"] == "png" and facts["rows"] == 12
    assert facts["transfer_syntax"] is None and facts["decoder"] == "pillow"


@pytest.mark.parametrize("kind", ["not_dicom", "truncated", "missing", "corrupt"])
def test_bad_files_exit_2_with_one_line(tmp_path: Path, capsys, kind: str) -> None:  # type: ignore[no-untyped-def]
    from dicom_cases import replace_pixel_stream

    path = tmp_path / f"{kind}.dcm"
    if kind == "not_dicom":
        path.write_bytes(b"plain text " * 40)
    elif kind == "truncated":
        full = write(tmp_path, "full.dcm", grey_image())
        path.write_bytes(full.read_bytes()[:-500])
    elif kind == "corrupt":
        good = write(tmp_path, "g.dcm", grey_image(), transfer_syntax=uid.RLELossless)
        replace_pixel_stream(good, path, b"\x07" * 100)
    out_file = tmp_path / "never.npy"
    code, out, err = _run(capsys, str(path), "--json", "--npy", str(out_file))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]
    assert "Traceback" not in err and not out_file.exists()
    assert not any(text in err for text in PHI_STRINGS)
