"""Per-center acquisition: what makes one hospital's images look unlike another's.

A :class:`SiteProfile` fixes a center's scanner behaviour (contrast curve, noise, blur, matrix
size, field of view, photometric interpretation, bit depth, signedness, transfer syntax, and for
ultrasound speckle size, dynamic range, gain and colour handling) plus its case mix (size and
label prevalence). Encoding "styles" rotate over the first centers in a fixed order so that even
a three-center federation mixes photometric interpretations, bit depths and compressions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydicom import uid as dicom_uid
from scipy import ndimage

from fedmsk.data.dicom_write import available_encode_syntaxes

# (transfer syntax, photometric, bits stored, signed, write window)
_XRAY_STYLES: tuple[tuple[str, str, int, bool, bool], ...] = (
    (dicom_uid.ExplicitVRLittleEndian, "MONOCHROME2", 12, False, True),
    (dicom_uid.RLELossless, "MONOCHROME1", 16, False, True),
    (dicom_uid.JPEG2000Lossless, "MONOCHROME2", 16, True, True),
    (dicom_uid.JPEGLSLossless, "MONOCHROME2", 8, False, False),
    (dicom_uid.ImplicitVRLittleEndian, "MONOCHROME1", 12, False, False),
    (dicom_uid.DeflatedExplicitVRLittleEndian, "MONOCHROME2", 10, False, True),
    (dicom_uid.JPEGLosslessSV1, "MONOCHROME2", 12, False, False),
    (dicom_uid.JPEGBaseline8Bit, "MONOCHROME2", 8, False, False),
    (dicom_uid.JPEG2000, "MONOCHROME1", 12, False, True),
)
# (transfer syntax, photometric)
_US_STYLES: tuple[tuple[str, str], ...] = (
    (dicom_uid.ExplicitVRLittleEndian, "RGB"),
    (dicom_uid.JPEGBaseline8Bit, "YBR_FULL_422"),
    (dicom_uid.RLELossless, "MONOCHROME2"),
    (dicom_uid.RLELossless, "YBR_FULL"),
    (dicom_uid.JPEGLSLossless, "RGB"),
    (dicom_uid.JPEG2000Lossless, "MONOCHROME2"),
    (dicom_uid.DeflatedExplicitVRLittleEndian, "RGB"),
    (dicom_uid.ImplicitVRLittleEndian, "MONOCHROME2"),
)
_JPEG_NEEDS_8BIT = {dicom_uid.JPEGBaseline8Bit}


@dataclass(frozen=True)
class SiteProfile:
    """How one center acquires and stores its images, and how many of which class it has."""

    index: int
    alias: str
    role: str
    kind: str  # "dicom" or "web"
    modality: str  # "xray" or "us"
    rows: int
    cols: int
    zoom: float
    rotation_deg: float
    blur: float
    gamma: float
    exposure: float
    noise: float
    heel: float
    low: float
    high: float
    photometric: str
    bits_stored: int
    signed: bool
    transfer_syntax: str
    write_window: bool
    marker: bool
    collimation: bool
    pixel_spacing: float
    target_images: int
    class_probs: tuple[float, ...]
    speckle: float
    dynamic_range_db: float
    gain_db: float
    tgc: float
    trapezoid: bool
    tint: tuple[float, float, float]

    def technical_summary(self) -> dict[str, Any]:
        """What federation.json records about the center (no PHI, no institution)."""
        if self.kind == "web":
            return {"kind": "web", "formats": ["png", "jpeg"], "size": "varied"}
        keep = ("rows", "cols", "photometric", "bits_stored", "signed", "kind")
        summary = {k: v for k, v in asdict(self).items() if k in keep}
        summary["transfer_syntax"] = dicom_uid.UID(self.transfer_syntax).name
        return summary


def _multiple_of_8(value: float, lo: int, hi: int) -> int:
    """Scanners write even matrix sizes; GDCM's RLE and JPEG encoders also fail on odd ones."""
    step = 8 if hi - lo >= 8 else 2
    snapped = int(round(float(value) / step) * step)
    low = -(-lo // step) * step
    return int(min(max(snapped, low), max(low, hi - hi % step)))


def _pick_syntax(preferred: str, available: tuple[str, ...]) -> str:
    return preferred if preferred in available else dicom_uid.ExplicitVRLittleEndian


def make_site_profile(
    *,
    rng: np.random.Generator,
    index: int,
    role: str,
    modality: str,
    web: bool,
    num_classes: int,
    size_range: tuple[int, int],
    scale: float,
) -> SiteProfile:
    """Draw a center's profile; the encoding style follows the center index."""
    available = available_encode_syntaxes()
    lo, hi = size_range
    rows = _multiple_of_8(rng.integers(lo, hi + 1), lo, hi)
    cols = _multiple_of_8(rows * rng.uniform(0.75, 1.33), lo, hi)
    if modality == "us":
        syntax, photometric = _US_STYLES[index % len(_US_STYLES)]
        syntax = _pick_syntax(syntax, available)
        if photometric == "YBR_FULL_422" and syntax != dicom_uid.JPEGBaseline8Bit:
            photometric = "YBR_FULL"
        bits, signed, window = 8, False, False
        rows, cols = min(rows, cols), max(rows, cols)
    else:
        syntax, photometric, bits, signed, window = _XRAY_STYLES[index % len(_XRAY_STYLES)]
        syntax = _pick_syntax(syntax, available)
    if syntax in _JPEG_NEEDS_8BIT:
        bits = 8
    if num_classes == 2:
        prevalence = rng.uniform(0.25, 0.6)
        probs = (1.0 - prevalence, prevalence)
    else:
        probs = tuple(float(p) for p in rng.dirichlet(np.full(num_classes, 4.0)))
    base = rng.uniform(40, 75) if role == "heldout" else rng.uniform(20, 80)
    tint_choice = rng.integers(0, 3)
    tint = ((1.0, 1.0, 1.0), (1.0, 0.93, 0.8), (0.9, 0.95, 1.0))[int(tint_choice)]
    return SiteProfile(
        index=index,
        alias=f"site{index:02d}",
        role=role,
        kind="web" if web else "dicom",
        modality=modality,
        rows=rows,
        cols=cols,
        zoom=float(rng.uniform(0.8, 1.25)),
        rotation_deg=float(rng.uniform(2.0, 12.0)),
        blur=float(rng.uniform(0.0, 1.3)),
        gamma=float(rng.uniform(0.65, 1.5)),
        exposure=float(rng.uniform(0.7, 1.5)),
        noise=float(rng.uniform(0.01, 0.06)),
        heel=float(rng.uniform(-0.12, 0.12)),
        low=float(rng.uniform(0.0, 0.15)),
        high=float(rng.uniform(0.6, 0.98)),
        photometric=photometric,
        bits_stored=bits,
        signed=signed,
        transfer_syntax=syntax,
        write_window=window,
        marker=bool(rng.random() < 0.5),
        collimation=bool(rng.random() < 0.3),
        pixel_spacing=float(rng.uniform(0.1, 0.2)),
        target_images=max(1, int(round(base * scale))),
        class_probs=probs,
        speckle=float(rng.uniform(0.7, 1.8)),
        dynamic_range_db=float(rng.uniform(40, 60)),
        gain_db=float(rng.uniform(8, 18)),
        tgc=float(rng.uniform(0.4, 0.9)),
        trapezoid=bool(rng.random() < 0.35),
        tint=tint,
    )


# --------------------------------------------------------------------------- geometry


def resample(
    canvas: np.ndarray,
    shape: tuple[int, int],
    *,
    zoom: float,
    rotation_deg: float = 0.0,
    shift: tuple[float, float] = (0.0, 0.0),
    flip: bool = False,
) -> np.ndarray:
    """Map the square canvas onto an output matrix: field of view, rotation, shift, mirror."""
    size = canvas.shape[0]
    rows, cols = shape
    extent = max(rows, cols) / 2.0
    scale = (size / 2.0) / (extent * zoom)
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = rot * scale
    if flip:
        matrix = matrix @ np.diag([1.0, -1.0])
    out_centre = np.array([(rows - 1) / 2.0, (cols - 1) / 2.0])
    in_centre = np.array(
        [(size - 1) / 2.0 + shift[0] * size / 2, (size - 1) / 2.0 + shift[1] * size / 2]
    )
    offset = in_centre - matrix @ out_centre
    return ndimage.affine_transform(
        canvas, matrix, offset=offset, output_shape=shape, order=1, mode="constant", cval=0.0
    )


# --------------------------------------------------------------------------- X-ray


_GLYPHS = {
    "L": ("1000", "1000", "1000", "1000", "1111"),
    "R": ("1110", "1001", "1110", "1010", "1001"),
}


def _burn_marker(image: np.ndarray, letter: str, value: float) -> None:
    glyph = _GLYPHS.get(letter)
    if glyph is None:
        return
    cell = max(1, image.shape[0] // 48)
    top, left = 2 * cell, 2 * cell
    for r, line in enumerate(glyph):
        for c, bit in enumerate(line):
            if bit == "1":
                image[
                    top + r * cell : top + (r + 1) * cell, left + c * cell : left + (c + 1) * cell
                ] = value


def acquire_xray(
    attenuation: np.ndarray,
    profile: SiteProfile,
    rng: np.random.Generator,
    *,
    laterality: str,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Attenuation canvas -> displayed brightness in [0, 1] (bone bright) at this center."""
    return acquire_xray_with_lesion(
        attenuation, None, profile, rng, laterality=laterality, shape=shape
    )[0]


def acquire_xray_with_lesion(
    attenuation: np.ndarray,
    lesion: np.ndarray | None,
    profile: SiteProfile,
    rng: np.random.Generator,
    *,
    laterality: str,
    shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`acquire_xray`, plus the canvas ``lesion`` mask carried through the same field of
    view, rotation, shift and mirror (it draws nothing from ``rng``: the image is unchanged)."""
    shape = shape or (profile.rows, profile.cols)
    rotation = rng.uniform(-profile.rotation_deg, profile.rotation_deg)
    shift = (rng.uniform(-0.08, 0.08), rng.uniform(-0.08, 0.08))
    zoom = profile.zoom * rng.uniform(0.93, 1.07)
    geometry = {"zoom": zoom, "rotation_deg": rotation, "shift": shift, "flip": laterality == "L"}
    att = resample(attenuation, shape, **geometry)
    placed = resample(lesion, shape, **geometry) if lesion is not None else None
    bright = 1.0 - np.exp(-profile.exposure * np.clip(att, 0, None))
    ramp = np.linspace(-1.0, 1.0, shape[0], dtype=np.float32)[:, None]
    bright = bright * (1.0 + profile.heel * ramp)
    bright = np.clip(bright, 0, 1) ** profile.gamma
    if profile.blur > 0.05:
        bright = ndimage.gaussian_filter(bright, profile.blur)
    quantum = rng.standard_normal(shape).astype(np.float32) * np.sqrt(bright + 0.02)
    bright = bright + profile.noise * quantum
    if profile.collimation:
        margin = max(2, shape[0] // 14)
        bright[:margin, :] = 0.9
        bright[-margin:, :] = 0.9
    bright = np.clip(bright, 0, 1)
    if profile.marker and laterality:
        _burn_marker(bright, laterality, 1.0)
    return bright.astype(np.float32), placed


@dataclass(frozen=True)
class StoredImage:
    """Integer pixels and the header values that make them display as intended."""

    pixels: np.ndarray
    window: tuple[float, float] | None
    rescale: tuple[float, float] | None


def to_stored_grey(bright: np.ndarray, profile: SiteProfile) -> StoredImage:
    """Brightness in [0, 1] -> stored values for the center's bit depth, sign and photometric."""
    bits = profile.bits_stored
    full = (1 << bits) - 1
    values = np.round((profile.low + bright * (profile.high - profile.low)) * full)
    values = np.clip(values, 0, full)
    if profile.photometric == "MONOCHROME1":
        values = full - values
    rescale = None
    stored = values
    if profile.signed:
        offset = 1 << (bits - 1)
        stored = values - offset
        rescale = (1.0, float(offset))
    dtype = np.int16 if profile.signed else (np.uint8 if bits <= 8 else np.uint16)
    stored = stored.astype(dtype)
    window = None
    if profile.write_window:
        lo, hi = np.percentile(values, [0.5, 99.5])
        width = max(float(hi - lo) * 1.05, 2.0)
        window = (float((lo + hi) / 2.0), width)
    return StoredImage(stored, window, rescale)


# --------------------------------------------------------------------------- ultrasound


def acquire_us(echo: np.ndarray, profile: SiteProfile, rng: np.random.Generator) -> np.ndarray:
    """Echogenicity canvas -> 8-bit RGB frame with speckle, log compression and scanner UI."""
    shape = (profile.rows, profile.cols)
    zoom = profile.zoom * rng.uniform(0.95, 1.05)
    shift = (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))
    amp = resample(echo, shape, zoom=zoom, shift=shift)
    sig = (profile.speckle * 0.6, profile.speckle * 1.4)
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sig) + 1j * (
        ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sig)
    )
    envelope = np.abs(field)
    envelope = envelope / max(float(np.sqrt(np.mean(envelope**2))), 1e-6)
    depth = np.linspace(0, 1, shape[0], dtype=np.float32)[:, None]
    attenuation = np.exp(-2.0 * depth * (1.0 - profile.tgc))
    intensity = np.clip(amp, 0, None) * envelope * attenuation + 1e-4
    db = 20.0 * np.log10(intensity)
    display = np.clip(
        (db + profile.dynamic_range_db - profile.gain_db) / profile.dynamic_range_db, 0, 1
    )
    display = display ** (profile.gamma * 0.8)
    if profile.blur > 0.6:
        display = ndimage.gaussian_filter(display, profile.blur - 0.5)
    rows, cols = shape
    x = np.abs(np.linspace(-1, 1, cols, dtype=np.float32))[None, :]
    half_width = 0.82 + (0.16 * depth if profile.trapezoid else 0.1)
    display = display * (x < half_width)
    grey = (display * 255.0).astype(np.float32)
    rgb = np.stack([grey * t for t in profile.tint], axis=-1)
    step = max(rows // 10, 4)
    right = cols - max(cols // 40, 2) - 1
    rgb[step::step, right, :] = 230.0
    for _ in range(int(rng.integers(1, 4))):
        r0 = int(rng.integers(1, max(rows // 8, 2)))
        c0 = int(rng.integers(1, max(cols // 3, 2)))
        rgb[
            r0 : r0 + max(rows // 40, 1),
            c0 : c0 + int(rng.integers(cols // 20 + 1, cols // 6 + 2)),
            :,
        ] = (220.0, 220.0, 90.0)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- web collection


def web_variant(bright: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str, int]:
    """A picture as found online: rescaled, re-contrasted, maybe coloured, framed, compressed.

    Returns (uint8 array (H, W) or (H, W, 3), file suffix, JPEG quality or 0 for PNG).
    """
    from PIL import Image

    img = np.clip(bright, 0, 1) ** rng.uniform(0.6, 1.6)
    img = rng.uniform(0.0, 0.15) + img * rng.uniform(0.7, 1.0)
    if rng.random() < 0.1:
        img = 1.0 - img
    height = int(rng.integers(90, 420))
    width = int(np.clip(height * rng.uniform(0.6, 1.5), 80, 520))
    pil = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).resize(
        (width, height), Image.BILINEAR
    )
    arr = np.asarray(pil)
    if rng.random() < 0.3:
        pad = int(rng.integers(3, 20))
        arr = np.pad(arr, pad, constant_values=int(rng.choice([0, 255])))
    if rng.random() < 0.4:
        tint = rng.uniform(0.85, 1.0, size=3)
        arr = np.clip(arr[..., None] * tint[None, None, :], 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        return arr, ".jpg", int(rng.integers(30, 96))
    return arr, ".png", 0
