"""Drawing primitives for the synthetic image models (pure numpy/scipy).

Every shape works on a square canvas whose coordinates run over [-1, 1] in both directions
(``u`` to the right, ``v`` downwards). X-ray shapes return chord lengths (how much material a
ray crosses), so overlapping bone, soft tissue and metal add up the way attenuation does; the
ultrasound models use the same helpers for bands and blobs of echogenicity.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

Point = tuple[float, float]


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) coordinate arrays of a ``size`` x ``size`` canvas, both in [-1, 1]."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(axis, axis, indexing="ij")
    return u, v


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -40, 40)))


def segment_coords(
    u: np.ndarray, v: np.ndarray, p0: Point, p1: Point
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the segment p0-p1 and the position along it (0 at p0, 1 at p1, clipped)."""
    du, dv = p1[0] - p0[0], p1[1] - p0[1]
    length2 = max(du * du + dv * dv, 1e-12)
    t = np.clip(((u - p0[0]) * du + (v - p0[1]) * dv) / length2, 0.0, 1.0)
    dist = np.hypot(u - (p0[0] + t * du), v - (p0[1] + t * dv))
    return dist, t


def chord(dist: np.ndarray, radius: np.ndarray | float) -> np.ndarray:
    """Path length of a ray through a cylinder/sphere of ``radius`` at distance ``dist``."""
    r = np.maximum(radius, 1e-6)
    return 2.0 * np.sqrt(np.clip(r * r - dist * dist, 0.0, None))


def rod(u: np.ndarray, v: np.ndarray, p0: Point, p1: Point, radius: float) -> np.ndarray:
    """Chord through a round rod (screw, nail, neck of a bone) between p0 and p1."""
    dist, _ = segment_coords(u, v, p0, p1)
    return chord(dist, radius)


def tapered_rod(
    u: np.ndarray, v: np.ndarray, p0: Point, p1: Point, r0: float, r1: float
) -> np.ndarray:
    dist, t = segment_coords(u, v, p0, p1)
    return chord(dist, r0 + (r1 - r0) * t)


def threaded_rod(
    u: np.ndarray,
    v: np.ndarray,
    p0: Point,
    p1: Point,
    radius: float,
    *,
    thread_from: float = 0.6,
    pitch: float = 0.03,
) -> np.ndarray:
    """A screw: smooth shank, threads (a radius ripple) from ``thread_from`` to the tip p1."""
    dist, t = segment_coords(u, v, p0, p1)
    length = float(np.hypot(p1[0] - p0[0], p1[1] - p0[1]))
    ripple = 0.35 * radius * np.sin(2 * np.pi * t * length / pitch)
    r = radius + np.where(t > thread_from, ripple, 0.0)
    return chord(dist, r)


def disk(u: np.ndarray, v: np.ndarray, centre: Point, radius: float) -> np.ndarray:
    """Chord through a sphere (femoral head, prosthetic head)."""
    return chord(np.hypot(u - centre[0], v - centre[1]), radius)


def smooth_box(
    u: np.ndarray,
    v: np.ndarray,
    centre: Point,
    half: tuple[float | np.ndarray, float | np.ndarray],
    edge: float,
) -> np.ndarray:
    """A rectangle with soft edges (1 inside, 0 outside)."""
    inside_u = sigmoid((half[0] - np.abs(u - centre[0])) / edge)
    inside_v = sigmoid((half[1] - np.abs(v - centre[1])) / edge)
    return inside_u * inside_v


def line_profile(
    u: np.ndarray, v: np.ndarray, point: Point, angle: float, width: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian profile across an infinite line through ``point`` at ``angle`` (radians).

    Returns (profile in [0, 1], signed distance along the line) so callers can cut the line.
    """
    cu, cv = np.cos(angle), np.sin(angle)
    across = -(u - point[0]) * cv + (v - point[1]) * cu
    along = (u - point[0]) * cu + (v - point[1]) * cv
    return np.exp(-((across / max(width, 1e-6)) ** 2)), along


def signed_side(u: np.ndarray, v: np.ndarray, point: Point, angle: float) -> np.ndarray:
    """Signed distance to the line through ``point`` at ``angle`` (positive on one side)."""
    cu, cv = np.cos(angle), np.sin(angle)
    return -(u - point[0]) * cv + (v - point[1]) * cu


def smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple[float, float]
) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation (texture, mottle)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    std = float(field.std())
    return field / std if std > 0 else field


def arc_mask(
    u: np.ndarray, v: np.ndarray, centre: Point, facing: float, half_span: float
) -> np.ndarray:
    """Soft mask of the directions within ``half_span`` of ``facing`` seen from ``centre``."""
    angle = np.arctan2(v - centre[1], u - centre[0])
    diff = np.angle(np.exp(1j * (angle - facing)))
    return sigmoid((half_span - np.abs(diff)) / 0.08)


def ring(u: np.ndarray, v: np.ndarray, centre: Point, radius: float, width: float) -> np.ndarray:
    """Gaussian ring (a rim seen edge-on)."""
    dist = np.hypot(u - centre[0], v - centre[1])
    return np.exp(-(((dist - radius) / max(width, 1e-6)) ** 2))


def gauss_blob(
    u: np.ndarray, v: np.ndarray, centre: Point, radii: tuple[float, float]
) -> np.ndarray:
    return np.exp(-(((u - centre[0]) / radii[0]) ** 2) - ((v - centre[1]) / radii[1]) ** 2)


def rotate_point(p: Point, angle: float) -> Point:
    c, s = np.cos(angle), np.sin(angle)
    return (float(c * p[0] - s * p[1]), float(s * p[0] + c * p[1]))


def add(p: Point, q: Point, scale: float = 1.0) -> Point:
    return (p[0] + scale * q[0], p[1] + scale * q[1])
