"""Decode throughput of a 2048x2048 12-bit radiograph per transfer syntax and decoder plugin.

Why: decoding shares the CPU with training, so the choice of stored syntax and of decoder
plugin decides whether a site can decode every epoch or must cache. Run:

    .venv/bin/python simulations/bench_decode.py [--size 2048] [--repeats 5]

Prints images/s through ``fedmsk.data.dicom.read_dicom`` (the default plugin order) and per
plugin through pydicom, plus file sizes. Single-threaded where the libraries allow.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from pydicom import dcmread, uid  # noqa: E402
from pydicom.pixels import get_decoder, pixel_array  # noqa: E402

from fedmsk.data.dicom import read_dicom  # noqa: E402
from fedmsk.data.dicom_write import encode_support, write_dicom  # noqa: E402

SYNTAXES = (
    ("uncompressed", uid.ExplicitVRLittleEndian),
    ("RLE", uid.RLELossless),
    ("JPEG-LS lossless", uid.JPEGLSLossless),
    ("JPEG 2000 lossless", uid.JPEG2000Lossless),
    ("JPEG 2000 lossy", uid.JPEG2000),
    ("JPEG lossless SV1", uid.JPEGLosslessSV1),
)


def radiograph(size: int, seed: int = 0) -> np.ndarray:
    """A smooth 12-bit image with soft-tissue-like blobs and detector noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = 800 + 600 * xx + 300 * yy
    for _ in range(12):
        cy, cx, r = rng.random(3)
        image += 1500 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
    image += rng.normal(0, 25, image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


def rate(func, repeats: int) -> float:  # type: ignore[no-untyped-def]
    func()  # warm-up: imports, plugin discovery
    start = time.process_time()  # CPU time: the machine is shared, wall time is noisy
    for _ in range(repeats):
        func()
    return repeats / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pixels = radiograph(args.size)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        size = f"{args.size}x{args.size} 12-bit"
        print(f"{size}, {args.repeats} repeats, images/s per core (CPU ms/image)")
        for label, ts in SYNTAXES:
            reason = encode_support(ts)
            if reason:
                print(f"{label:20s} skipped: {reason}")
                continue
            path = write_dicom(Path(tmp) / f"{label}.dcm", pixels, transfer_syntax=ts)
            size_mb = path.stat().st_size / 1e6
            decoded = read_dicom(path)
            per_second = rate(lambda p=path: read_dicom(p), args.repeats)
            exact = np.array_equal(decoded.values, pixels)
            print(
                f"{label:20s} {size_mb:5.2f} MB  read_dicom: {per_second:6.1f}/s "
                f"({1000 / per_second:6.1f} ms) via {decoded.decoder}, bit-exact={exact}"
            )
            if ts == uid.ExplicitVRLittleEndian:
                continue
            ds = dcmread(path)
            for plugin in sorted(get_decoder(ts).available_plugins):
                try:
                    speed = rate(
                        lambda d=ds, p=plugin: pixel_array(d, decoding_plugin=p), args.repeats
                    )
                except Exception as exc:  # a plugin that cannot do this syntax
                    print(f"{'':20s}   {plugin:10s} failed: {str(exc).splitlines()[0][:80]}")
                    continue
                print(f"{'':20s}   {plugin:10s} {speed:6.1f}/s ({1000 / speed:6.1f} ms)")


if __name__ == "__main__":
    main()
