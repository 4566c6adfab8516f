"""On-disk preprocessing cache: decode, resize and convert each image once, not every epoch.

Decoding a compressed radiograph costs 5-500 ms of the same CPU that trains the model, and a
decoded, resized array reads back in about 0.1 ms (see NOTES-platform.md), so every image is
decoded once and stored as a ``.npy`` array of shape (C, H, W).

Entries are keyed by the SHA-256 of the file's bytes plus the preprocessing parameters (size,
channels, frame, storage dtype) and :data:`CACHE_VERSION`: a changed file or a changed parameter
simply misses, and stale entries are never read. Failures are not cached: a file that failed
because a decoder plugin was missing must succeed once the plugin is installed.

Resizing keeps the aspect ratio: the image is padded with black (0) to a square, centred, then
resized to ``image_size``. Radiographs come in many aspect ratios and a plain resize would
stretch bone geometry differently per site; black is the background of a windowed radiograph.

Two processes may fill the same cache at once: every file is written to a temporary name in the
target folder and moved into place with :func:`os.replace`, which is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedmsk.data import errors
from fedmsk.data.errors import ImageReadError
from fedmsk.data.images import load_image, to_channels

CACHE_VERSION = "1"
CACHE_DIR_NAME = ".fedmsk-cache"
_HASH_CHUNK = 1 << 20
RACY_SECONDS = 2.0

Decoder = Callable[..., Any]


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that changes a cached array; part of every cache key."""

    image_size: int
    in_chans: int
    frame: str = "0"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "uint8"):
            raise ValueError(f"cache dtype {self.dtype!r}: use 'float16' or 'uint8'")
        if self.image_size < 1:
            raise ValueError(f"data.image_size={self.image_size}: must be a positive integer")
        if self.in_chans not in (1, 3):
            raise ValueError(f"data.in_chans={self.in_chans}: must be 1 or 3")

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": CACHE_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir(site_dir: Path, cache_dir: str | Path | None = None) -> Path:
    """``DataConfig.cache_dir`` when set, else ``SITE_DIR/.fedmsk-cache``."""
    return Path(cache_dir) if cache_dir else Path(site_dir) / CACHE_DIR_NAME


def stat_signature(path: Path) -> list[int]:
    """What changes when a file's bytes may have changed: size, mtime, ctime, inode."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def settled(signature: list[int]) -> bool:
    """Whether a file last changed long enough ago (``RACY_SECONDS``) that a write within the
    same timestamp tick cannot hide behind an unchanged signature."""
    return time.time() - max(signature[1], signature[2]) / 1e9 > RACY_SECONDS


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_npy(target: Path, array: np.ndarray) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pad_to_square(pixels: np.ndarray) -> np.ndarray:
    """Centre an (H, W, C) image on a black square canvas."""
    height, width, channels = pixels.shape
    side = max(height, width)
    if height == width:
        return pixels
    canvas = np.zeros((side, side, channels), dtype=pixels.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = pixels
    return canvas


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Pad to square, then resize each channel to ``size`` x ``size`` (antialiased bilinear)."""
    square = pad_to_square(np.asarray(pixels, dtype=np.float32))
    if square.shape[0] == size:
        return square
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(square[:, :, c]), mode="F").resize(
                (size, size), Image.Resampling.BILINEAR
            )
        )
        for c in range(square.shape[2])
    ]
    return np.clip(np.stack(planes, axis=2), 0.0, 1.0)


def preprocess(pixels: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """(H, W, C) float [0, 1] -> (in_chans, size, size) in the storage dtype."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[2] > params.in_chans:
        pixels = to_channels(pixels, params.in_chans)
    resized = resize_square(pixels, params.image_size)
    if resized.shape[2] != params.in_chans:
        resized = to_channels(resized, params.in_chans)
    chw = np.ascontiguousarray(np.transpose(resized, (2, 0, 1)))
    if params.dtype == "uint8":
        return np.round(chw * 255.0).astype(np.uint8)
    return chw.astype(np.float16)


def to_float(array: np.ndarray) -> np.ndarray:
    """A cached array back to float32 in [0, 1]."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def _missing_file_error(path: Path, exc: OSError) -> ImageReadError:
    cls = getattr(errors, "UnreadableImageError", ImageReadError)
    cause = "file not found" if isinstance(exc, FileNotFoundError) else f"cannot read file ({exc})"
    return cls(path, cause)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    decodes: int = 0


class PreprocessCache:
    """Preprocessed arrays for one set of parameters, stored under ``root``.

    ``get(path)`` returns a (C, H, W) array in the storage dtype or raises
    :class:`ImageReadError`. ``decoder`` defaults to :func:`load_image`; tests pass a counting
    one. Content hashes are remembered per file (size, mtime, ctime, inode) so that a second run
    does not re-read every file; a hash is only remembered once the file is older than two
    seconds, so a file rewritten within the filesystem's timestamp granularity is re-hashed.
    """

    def __init__(
        self, root: Path, params: PreprocessParams, decoder: Decoder | None = None
    ) -> None:
        self.root = Path(root)
        self.params = params
        self.decoder = decoder or load_image
        self.stats = CacheStats()
        self._entries = self.root / f"v{CACHE_VERSION}" / params.key()
        self._hash_memo = self.root / "hashes"

    def content_hash(self, path: Path) -> str:
        """SHA-256 of the file's bytes, via the stat-keyed memo when it is safe."""
        path = Path(path)
        try:
            signature = stat_signature(path)
            memo = self._hash_memo / (hashlib.sha256(str(path.resolve()).encode()).hexdigest())
            try:
                record = json.loads(memo.read_text())
                if record.get("stat") == signature:
                    return str(record["sha256"])
            except (OSError, ValueError, KeyError):
                pass
            digest = file_sha256(path)
        except OSError as exc:
            raise _missing_file_error(path, exc) from exc
        if settled(signature):
            payload = json.dumps({"stat": signature, "sha256": digest}).encode()
            with contextlib.suppress(OSError):
                _atomic_write_bytes(memo, payload)
        return digest

    def entry_path(self, digest: str) -> Path:
        return self._entries / digest[:2] / f"{digest}.npy"

    def get(self, path: Path, digest: str | None = None) -> np.ndarray:
        """The preprocessed array for ``path``, decoding and storing it on a miss."""
        path = Path(path)
        digest = digest or self.content_hash(path)
        entry = self.entry_path(digest)
        cached = self._read_entry(entry)
        if cached is not None:
            self.stats.hits += 1
            return cached
        self.stats.misses += 1
        return self._fill(path, entry)

    def _read_entry(self, entry: Path) -> np.ndarray | None:
        try:
            array = np.load(entry, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        expected = (self.params.in_chans, self.params.image_size, self.params.image_size)
        return array if array.shape == expected else None

    def _fill(self, path: Path, entry: Path) -> np.ndarray:
        self.stats.decodes += 1
        try:
            loaded = self.decoder(path, frame=self.params.frame)
            array = preprocess(np.asarray(loaded.pixels), self.params)
        except ImageReadError:
            raise
        except OSError as exc:
            raise _missing_file_error(path, exc) from exc
        except Exception as exc:  # a decoder bug must cost one image, not the round
            cls = getattr(errors, "UnreadableImageError", ImageReadError)
            raise cls(path, f"{type(exc).__name__}: {exc}") from exc
        _atomic_save_npy(entry, array)
        return array
