"""Ultrasound models: ankle ligament (ATFL) grades and the gouty first MTP joint.

The models draw an echogenicity map in probe coordinates (rows = depth, columns = lateral
position). Speckle, depth attenuation, time-gain compensation, log compression and the scanner's
colour handling belong to the acquisition stage of each center, because they are what differs
between machines.
"""

from __future__ import annotations

import numpy as np

from fedmsk.data import synthetic_draw as d
from fedmsk.data.synthetic_xray import Anatomy, Rendered


def _depth(v: np.ndarray) -> np.ndarray:
    return (v + 1.0) / 2.0


def _soft_tissue(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, skin: float) -> np.ndarray:
    depth = _depth(v)
    size = u.shape[0]
    base = 0.35 + 0.08 * d.smooth_noise(rng, u.shape, (size / 40.0, size / 15.0))
    skin_line = 1.3 * np.exp(-(((depth - skin) / 0.008) ** 2))
    return np.clip(base, 0.05, None) * (depth > skin) + skin_line


def _bone_surface(
    depth: np.ndarray, surface: np.ndarray, mask: np.ndarray, brightness: float = 2.2
) -> tuple[np.ndarray, np.ndarray]:
    """(bright cortical line, acoustic shadow factor) for a bone surface at depth ``surface``."""
    line = brightness * np.exp(-(((depth - surface) / 0.012) ** 2)) * mask
    shadow = 1.0 - 0.95 * d.sigmoid((depth - surface - 0.015) / 0.006) * mask
    return line, shadow


# --------------------------------------------------------------------------- ankle ligament


def ligament_anatomy(rng: np.random.Generator, label: int) -> Anatomy:
    return {
        "skin": rng.uniform(0.03, 0.06),
        "lig_depth": rng.uniform(0.36, 0.5),
        "slope": rng.uniform(-0.06, 0.08),
        "thickness": rng.uniform(0.05, 0.075),
        "period": rng.uniform(0.014, 0.022),
        "tear_pos": rng.uniform(-0.15, 0.2),
        "tear_len": rng.uniform(0.1, 0.28),
        "thin": rng.uniform(0.35, 0.7),
        "cleft": rng.uniform(0.3, 0.7),
        "effusion": rng.uniform(0.0, 1.0),
        "anisotropy": rng.random() < 0.4,
        "severity": rng.uniform(0.35, 1.0),
    }


def ligament_render(
    anatomy: Anatomy, label: int, view: str, rng: np.random.Generator, size: int
) -> Rendered:
    u, v = d.grid(size)
    a = anatomy
    depth = _depth(v)
    echo = _soft_tissue(rng, u, v, a["skin"])
    centre = a["lig_depth"] + a["slope"] * u + 0.03 * np.sin(2.5 * u)
    across = depth - centre
    stress = 1.4 if view == "anterior_drawer" and label > 0 else 1.0
    thickness = np.full_like(u, a["thickness"])
    along = u - a["tear_pos"]
    in_tear = d.sigmoid((a["tear_len"] * stress / 2 - np.abs(along)) / 0.015)
    severity = a["severity"]
    if label == 1:
        thickness = thickness * (1.0 - (1.0 - a["thin"]) * in_tear * severity)
    band = d.sigmoid((thickness / 2 - np.abs(across)) / 0.006) * d.sigmoid(
        (0.75 - np.abs(u)) / 0.03
    )
    fibres = 0.95 * (1.0 + 0.45 * np.cos(2 * np.pi * across / a["period"]))
    lig_echo = fibres
    if a["anisotropy"]:
        lig_echo = lig_echo * (
            1.0 - 0.45 * d.gauss_blob(u, v, (rng.uniform(-0.5, 0.5), 0.0), (0.12, 5.0))
        )
    visibility = 0.3 if a["anisotropy"] and label == 0 else 0.0
    if label == 1:
        cleft = in_tear * d.sigmoid((across - thickness * (0.5 - a["cleft"])) / 0.006)
        lig_echo = lig_echo * (1.0 - 0.7 * severity * cleft)
        visibility = 0.3 + 0.5 * severity
    if label == 2:
        gap = in_tear * (0.6 + 0.4 * severity)
        lig_echo = lig_echo * (1.0 - gap) + 0.06 * gap
        stump = d.sigmoid((a["tear_len"] * stress / 2 + 0.08 - np.abs(along)) / 0.02) - in_tear
        band = np.clip(
            band + 0.6 * stump * d.sigmoid((a["thickness"] * 0.8 - np.abs(across)) / 0.01), 0, 1
        )
        lig_echo = lig_echo * (1.0 - 0.35 * np.clip(stump, 0, 1))
        visibility = 0.5 + 0.5 * severity
    echo = echo * (1.0 - band) + band * lig_echo
    if label > 0 or a["effusion"] > 0.8:
        amount = 0.85 if label > 0 else 0.4
        fluid = d.gauss_blob(
            u,
            v,
            (a["tear_pos"], a["lig_depth"] * 2 - 1 - 0.12),
            (0.25 * a["effusion"] + 0.05, 0.05),
        )
        echo = echo * (1.0 - amount * a["effusion"] * fluid)
    fib_surface = 0.62 + 0.9 * (u + 0.45) ** 2
    fib_mask = d.sigmoid((-0.35 - u) / 0.03)
    tal_surface = 0.66 + 0.5 * (u - 0.55) ** 2
    tal_mask = d.sigmoid((u - 0.42) / 0.03)
    for surface, mask in ((fib_surface, fib_mask), (tal_surface, tal_mask)):
        line, shadow = _bone_surface(depth, surface, mask)
        echo = echo * shadow + line
    return Rendered(echo.astype(np.float32), float(visibility))


# --------------------------------------------------------------------------- gout, first MTP


def gout_anatomy(rng: np.random.Generator, label: int) -> Anatomy:
    return {
        "skin": rng.uniform(0.03, 0.05),
        "joint_u": rng.uniform(-0.1, 0.15),
        "bone_depth": rng.uniform(0.5, 0.62),
        "cartilage": rng.uniform(0.025, 0.04),
        "findings": rng.random(4) < np.array([0.6, 0.45, 0.35, 0.4]),
        "strength": rng.uniform(0.35, 1.0),
        "physiological_fluid": rng.random() < 0.3,
        "interface_sign": rng.random() < 0.4,
    }


_GOUT_VIEWS = {
    "dorsal": (1.0, 0.0, True),
    "medial": (0.8, -0.05, False),
    "plantar": (1.15, 0.06, False),
}


def gout_render(
    anatomy: Anatomy, label: int, view: str, rng: np.random.Generator, size: int
) -> Rendered:
    u, v = d.grid(size)
    a = anatomy
    curvature, depth_shift, tendon = _GOUT_VIEWS.get(view, _GOUT_VIEWS["dorsal"])
    depth = _depth(v)
    echo = _soft_tissue(rng, u, v, a["skin"] + (0.04 if view == "plantar" else 0.0))
    ju = a["joint_u"]
    bd = a["bone_depth"] + depth_shift
    meta_surface = (
        bd
        + curvature * 1.2 * np.clip(u - (ju - 0.45), None, 0) ** 2
        + 0.5 * curvature * np.clip(u - ju + 0.05, 0, None) ** 2 * 8
    )
    meta_mask = d.sigmoid((ju - 0.03 - u) / 0.02)
    phal_surface = bd + 0.04 + 0.6 * (u - ju - 0.5) ** 2 * curvature
    phal_mask = d.sigmoid((u - ju - 0.05) / 0.02)
    cartilage = np.clip(meta_surface - depth, 0, None) < a["cartilage"]
    cart_band = cartilage * (depth < meta_surface) * meta_mask
    echo = echo * (1 - 0.85 * cart_band)
    if tendon:
        tdepth = a["skin"] + 0.12
        band = d.sigmoid((0.025 - np.abs(depth - tdepth)) / 0.005)
        echo = echo * (1 - band) + band * 0.9 * (
            1 + 0.4 * np.cos(2 * np.pi * (depth - tdepth) / 0.012)
        )
    capsule = 0.7 * np.exp(
        -(((depth - (bd - 0.14 - 0.1 * np.exp(-(((u - ju) / 0.25) ** 2)))) / 0.01) ** 2)
    )
    echo = echo + capsule * d.sigmoid((0.5 - np.abs(u - ju)) / 0.05)
    if a["interface_sign"]:
        echo = echo + 0.5 * np.exp(
            -(((depth - (meta_surface - a["cartilage"])) / 0.005) ** 2)
        ) * meta_mask * d.sigmoid((0.1 - np.abs(u - ju + 0.35)) / 0.03)
    if a["physiological_fluid"]:
        echo = echo * (1 - 0.6 * d.gauss_blob(u, v, (ju, 2 * (bd - 0.07) - 1), (0.08, 0.03)))
    visibility = 0.25 if label == 0 and (a["interface_sign"] or a["physiological_fluid"]) else 0.0
    if label == 1:
        s = a["strength"] * rng.uniform(0.6, 1.0)
        double_contour, tophus, erosion, effusion = a["findings"]
        if not a["findings"].any():
            double_contour = True
        if double_contour:
            irregular = 0.004 * d.smooth_noise(rng, u.shape, (1.0, size / 30.0))
            dc = (
                np.exp(-(((depth - (meta_surface - a["cartilage"]) + irregular) / 0.007) ** 2))
                * meta_mask
            )
            echo = echo + 1.4 * s * dc * (u > ju - 0.6)
        if tophus:
            centre = (ju - 0.05, 2 * (bd - 0.09) - 1)
            blob = d.gauss_blob(u, v, centre, (0.12, 0.07))
            halo = d.gauss_blob(u, v, centre, (0.17, 0.1)) - blob
            het = 1.0 + 0.5 * d.smooth_noise(rng, u.shape, size / 60.0)
            echo = echo * (1 - 0.7 * s * halo) + s * 0.9 * blob * np.clip(het, 0.2, None)
        if erosion:
            notch = 0.05 * s * d.gauss_blob(u, v, (ju - 0.25, 0.0), (0.05, 10.0))
            meta_surface = meta_surface + notch
        if effusion:
            echo = echo * (
                1 - 0.85 * s * d.gauss_blob(u, v, (ju, 2 * (bd - 0.08) - 1), (0.2, 0.05))
            )
        visibility = float(s)
    for surface, mask in ((meta_surface, meta_mask), (phal_surface, phal_mask)):
        line, shadow = _bone_surface(depth, surface, mask)
        echo = echo * shadow + line
    if view == "plantar":
        for su in (ju - 0.35, ju + 0.1):
            ses = d.ring(u, v, (su, 2 * (bd + 0.15) - 1), 0.1, 0.01) * (v < 2 * (bd + 0.15) - 1)
            echo = echo + 1.2 * ses
    return Rendered(echo.astype(np.float32), visibility)
