"""Typed errors for images that cannot be read.

A site may hold thousands of files, some broken. Each failure is an :class:`ImageReadError`
naming the file and the cause, so ``fedmsk data check`` can list them and a loader can skip them.
The message holds the path and so stays on the node; only ``type(err).__name__`` may leave it.
"""

from __future__ import annotations

from pathlib import Path


class ImageReadError(Exception):
    """An image file that cannot be decoded; ``str(err)`` is ``"{path}: {cause}"``."""

    def __init__(self, path: Path | str, cause: str) -> None:
        self.path = Path(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # Keep the (path, cause) signature when errors cross process boundaries (DataLoader
        # workers, Ray), where the default pickling would call __init__ with one argument.
        return (type(self), (self.path, self.cause))


class NotDicomError(ImageReadError):
    """The file is not DICOM (no preamble/meta and no parsable dataset)."""


class NoPixelDataError(ImageReadError):
    """A DICOM object without an image (a structured report, a presentation state...)."""


class UnsupportedTransferSyntaxError(ImageReadError):
    """Compressed with a transfer syntax that no installed decoder handles."""


class CorruptPixelDataError(ImageReadError):
    """Pixel data present but not decodable, or inconsistent with the header."""


class TruncatedFileError(ImageReadError):
    """The file ends before its header or pixel data do."""


class EmptyImageError(ImageReadError):
    """An image with zero rows, columns or frames."""


class UnreadableImageError(ImageReadError):
    """A non-DICOM image (PNG, JPEG...) that cannot be opened, or a file that cannot be read."""


__all__ = [
    "CorruptPixelDataError",
    "EmptyImageError",
    "ImageReadError",
    "NoPixelDataError",
    "NotDicomError",
    "TruncatedFileError",
    "UnreadableImageError",
    "UnsupportedTransferSyntaxError",
]
