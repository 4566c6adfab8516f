"""Radiograph models: long-bone fracture, hip implants, vertebral compression, dislocation.

Each model has two halves. ``*_anatomy(rng, label)`` draws what belongs to the patient (bone
size, density, where the fracture is, which implant), so all images of a patient share it;
``*_render(anatomy, label, view, rng, size)`` draws one view of it as an attenuation map (chord
lengths times densities) on a square canvas, leaving contrast, noise, blur, resolution and
encoding to the acquisition stage of the center. Class signals vary in strength on purpose, and
both classes carry look-alike distractors, so a classifier has to learn the finding itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmsk.data import synthetic_draw as d

Anatomy = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    """One drawn image before acquisition.

    ``signal``: attenuation (X-ray) or echogenicity (ultrasound), float32 square canvas.
    ``visibility``: how conspicuous the class finding is (positives), or how strongly a
    look-alike shows (negatives), in [0, 1]; the reader-study model uses it.
    ``lesion``: where the finding is drawn (canvas mask in [0, 1]) for renderers that know it,
    so explanations can be scored against it; None for negatives and other renderers.
    """

    signal: np.ndarray
    visibility: float
    lesion: np.ndarray | None = None


# --------------------------------------------------------------------------- long-bone fracture


def fracture_anatomy(rng: np.random.Generator, label: int) -> Anatomy:
    subtle = rng.random() < 0.3
    return {
        "x0": rng.uniform(-0.1, 0.1),
        "half_width": rng.uniform(0.17, 0.27),
        "cortex": rng.uniform(0.22, 0.4),
        "soft": rng.uniform(2.0, 2.9),
        "cortex_density": rng.uniform(0.85, 1.15),
        "marrow_density": rng.uniform(0.18, 0.32),
        "trabecular": rng.uniform(0.25, 0.6),
        "flare_end": rng.choice([-1.0, 1.0]),
        "flare": rng.uniform(0.2, 0.7),
        "frac_v": rng.uniform(-0.55, 0.55),
        "frac_angle": rng.uniform(0.35, 1.1) * rng.choice([-1.0, 1.0]),
        "frac_depth": rng.uniform(0.3, 0.55) if subtle else rng.uniform(0.55, 0.95),
        "frac_width": rng.uniform(0.018, 0.028) if subtle else rng.uniform(0.028, 0.05),
        "frac_step": 0.0 if subtle or rng.random() < 0.3 else rng.uniform(0.04, 0.12),
        "frac_extent": rng.uniform(0.5, 0.9) if subtle else rng.uniform(0.9, 1.6),
        "canal": rng.random() < 0.45,
        "canal_v": rng.uniform(-0.6, 0.6),
        "skin_fold": rng.random() < 0.35,
        "growth_lines": rng.random() < 0.3,
        "vessel": rng.random() < 0.3,
    }


_FRACTURE_VIEWS = {
    "ap": (1.0, 1.0, 1.0),
    "lateral": (0.86, -0.7, 0.85),
    "oblique": (0.93, 0.5, 0.7),
}


def fracture_render(
    anatomy: Anatomy, label: int, view: str, rng: np.random.Generator, size: int
) -> Rendered:
    u, v = d.grid(size)
    width_factor, angle_factor, vis_factor = _FRACTURE_VIEWS.get(view, (1.0, 1.0, 1.0))
    a = anatomy
    half = (
        a["half_width"]
        * width_factor
        * (1.0 + a["flare"] * np.clip(a["flare_end"] * v - 0.25, 0, None) ** 2 * 2.0)
    )
    angle = a["frac_angle"] * angle_factor + rng.normal(0, 0.08)
    point = (a["x0"], a["frac_v"])
    centre = np.full_like(u, a["x0"])
    if label == 1 and a["frac_step"] > 0:
        side = d.sigmoid(d.signed_side(u, v, point, angle) / 0.006)
        centre = centre + a["frac_step"] * half * side * rng.uniform(0.6, 1.0)
    dist = np.abs(u - centre)
    outer = d.chord(dist, half)
    inner = d.chord(dist, half * (1.0 - a["cortex"]))
    texture = d.smooth_noise(rng, u.shape, (size / 60.0, size / 200.0))
    marrow = a["marrow_density"] * (1.0 + a["trabecular"] * texture)
    norm = 1.0 / (2.0 * a["half_width"])
    bone = norm * (a["cortex_density"] * (outer - inner) + np.clip(marrow, 0, None) * inner)
    soft_half = a["half_width"] * a["soft"] * width_factor
    soft = d.chord(np.abs(u - a["x0"] * 0.6), soft_half) * 0.25 / (2.0 * soft_half)
    visibility = 0.0
    if a["growth_lines"]:
        for k in range(int(rng.integers(1, 4))):
            prof, _ = d.line_profile(u, v, (0.0, a["flare_end"] * (0.6 + 0.1 * k)), 0.0, 0.008)
            bone = bone + 0.12 * prof * (inner > 0)
    if a["canal"]:
        prof, along = d.line_profile(u, v, (a["x0"], a["canal_v"]), np.pi / 2 - 0.25, 0.01)
        cut = d.sigmoid((0.12 - np.abs(along)) / 0.02)
        bone = bone * (1.0 - 0.35 * prof * cut * ((outer - inner) > 0))
        visibility = max(visibility, 0.35)
    lesion = None
    if label == 1:
        depth = a["frac_depth"] * vis_factor * rng.uniform(0.75, 1.0)
        wobble = 0.006 * np.sin(20 * v + rng.uniform(0, 6))
        prof, along = d.line_profile(u + wobble, v, point, angle, a["frac_width"])
        extent = a["frac_extent"] * half
        cut = d.sigmoid((extent - np.abs(along + 0.5 * extent * (a["frac_extent"] < 0.9))) / 0.01)
        bone = bone * (1.0 - depth * prof * cut)
        lesion = (prof * cut * (outer > 0)).astype(np.float32)  # the fracture line in the bone
        visibility = float(np.clip(depth + 2.0 * a["frac_step"] + 0.1 * a["frac_extent"], 0, 1))
    signal = soft + bone
    if a["skin_fold"]:
        side = d.signed_side(u, v, (rng.uniform(-0.5, 0.5), 0.0), rng.uniform(0.3, 1.2))
        fold = d.sigmoid(side / 0.005) * np.exp(-np.clip(side, 0, None) / 0.04)
        signal = signal + 0.06 * fold * (soft > 0)
        visibility = max(visibility, 0.2) if label == 0 else visibility
    if a["vessel"]:
        prof, _ = d.line_profile(u, v, (a["x0"] + soft_half * 0.6, 0.0), np.pi / 2 + 0.05, 0.006)
        dots = (np.sin(v * 60 + rng.uniform(0, 6)) > 0.3).astype(np.float32)
        signal = signal + 0.08 * prof * dots
    return Rendered(signal.astype(np.float32), visibility, lesion)


# --------------------------------------------------------------------------- hip implants


def _femur_geometry(rng: np.random.Generator) -> Anatomy:
    neck_shaft = np.deg2rad(rng.uniform(122, 138))
    return {
        "xs": rng.uniform(0.12, 0.26),
        "shaft_half": rng.uniform(0.13, 0.18),
        "neck_shaft": neck_shaft,
        "neck_len": rng.uniform(0.42, 0.55),
        "head_r": rng.uniform(0.15, 0.19),
        "density": rng.uniform(0.8, 1.2),
        "pelvis": rng.uniform(0.5, 0.9),
        "soft": rng.uniform(0.12, 0.25),
    }


def _femur_points(a: Anatomy, neck_factor: float) -> dict[str, d.Point]:
    direction = (-float(np.sin(a["neck_shaft"])), float(np.cos(a["neck_shaft"])))
    base = (a["xs"] - 0.02, 0.02)
    head = d.add(base, direction, a["neck_len"] * neck_factor)
    lateral_x = a["xs"] + a["shaft_half"]
    s = (lateral_x - head[0]) / max(-direction[0], 1e-3)
    entry = d.add(head, direction, -s)
    return {"dir": direction, "base": base, "head": head, "entry": entry}


def implant_anatomy(rng: np.random.Generator, label: int) -> Anatomy:
    a = _femur_geometry(rng)
    a.update(
        {
            "n_screws": int(rng.integers(2, 5)),
            "n_cannulated": int(rng.integers(2, 4)),
            "plate_top": rng.uniform(0.2, 0.45),
            "plate_len": rng.uniform(0.55, 0.85),
            "metal": rng.uniform(10.0, 18.0),
            "head_scale": rng.uniform(0.92, 1.05),
            "tha_head": rng.uniform(0.09, 0.12),
            "shaft_fracture": rng.random() < 0.5,
            "cup_screws": int(rng.integers(0, 3)),
            "nail_len": rng.uniform(0.9, 1.3),
        }
    )
    return a


def _proximal_femur(
    u: np.ndarray,
    v: np.ndarray,
    a: Anatomy,
    pts: dict[str, d.Point],
    with_head: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    xs, half = a["xs"], a["shaft_half"]
    dist = np.abs(u - xs)
    shaft = (d.chord(dist, half) - 0.7 * d.chord(dist, half * 0.62)) * d.sigmoid((v + 0.05) / 0.03)
    neck = d.rod(u, v, pts["base"], pts["head"], a["head_r"] * 0.62)
    troch = d.disk(u, v, (xs + half * 0.6, -0.05), half * 0.75)
    lesser = d.disk(u, v, (xs - half * 0.9, 0.28), 0.05)
    bone = shaft + 0.8 * neck + 0.6 * troch + 0.5 * lesser
    if with_head:
        bone = bone + d.disk(u, v, pts["head"], a["head_r"])
    texture = d.smooth_noise(rng, u.shape, u.shape[0] / 70.0)
    bone = bone * (1.0 + 0.15 * texture)
    head = pts["head"]
    socket_dir = float(np.arctan2(-pts["dir"][1], -pts["dir"][0])) + np.pi
    rim = d.ring(u, v, head, a["head_r"] + 0.025, 0.012) * d.arc_mask(u, v, head, socket_dir, 1.3)
    pelvis = a["pelvis"] * d.gauss_blob(u, v, d.add(head, (-0.25, -0.3)), (0.45, 0.35))
    foramen = d.gauss_blob(u, v, d.add(head, (0.05, 0.45)), (0.12, 0.08))
    return 2.0 * a["density"] * bone + 0.4 * rim + 0.3 * pelvis * (1 - 0.6 * foramen)


def _stem(u: np.ndarray, v: np.ndarray, a: Anatomy, pts: dict[str, d.Point]) -> np.ndarray:
    xs = a["xs"]
    stem = d.tapered_rod(u, v, (xs - 0.02, -0.02), (xs, 0.75), 0.06, 0.02)
    neck = d.rod(u, v, (xs - 0.02, -0.02), pts["head"], 0.032)
    return stem + neck


def implant_render(
    anatomy: Anatomy, label: int, view: str, rng: np.random.Generator, size: int
) -> Rendered:
    u, v = d.grid(size)
    a = anatomy
    lateral = view == "lateral"
    pts = _femur_points(a, 0.55 if lateral else 1.0)
    head, direction, entry = pts["head"], pts["dir"], pts["entry"]
    with_head = label not in (3, 4)
    signal = _proximal_femur(u, v, a, pts, with_head, rng)
    signal = signal + a["soft"] * d.chord(np.abs(u - 0.05), 0.95) / 1.9
    plate_w = 0.012 if lateral else 0.03
    metal = np.zeros_like(u)
    xs, half = a["xs"], a["shaft_half"]
    if label == 0:  # dynamic hip screw: lag screw + barrel + side plate with screws
        tip = d.add(head, direction, 0.55 * a["head_r"])
        metal += d.threaded_rod(u, v, entry, tip, 0.03, thread_from=0.7)
        metal += d.rod(u, v, entry, d.add(entry, direction, 0.2), 0.05)
        bottom = (entry[0], entry[1] + a["plate_len"])
        metal += d.rod(u, v, entry, bottom, plate_w) * 1.2
        for k in range(a["n_screws"]):
            y = entry[1] + 0.18 + k * (a["plate_len"] - 0.2) / max(a["n_screws"], 1)
            metal += d.threaded_rod(u, v, (entry[0], y), (xs - half, y), 0.014, thread_from=0.2)
    elif label == 1:  # proximal femoral nail: intramedullary nail + neck screw + distal lock
        top = (xs - 0.03, -0.3)
        end = (xs, -0.3 + a["nail_len"] + 0.3)
        metal += d.tapered_rod(u, v, top, end, 0.045, 0.03)
        tip = d.add(head, direction, 0.5 * a["head_r"])
        metal += d.threaded_rod(u, v, entry, tip, 0.032, thread_from=0.75)
        y = end[1] - 0.12
        metal += d.rod(u, v, (xs + half, y), (xs - half, y), 0.014)
    elif label == 2:  # cannulated screws: 2-3 thin parallel screws along the neck, no plate
        normal = (-direction[1], direction[0])
        offsets = np.linspace(-0.055, 0.055, a["n_cannulated"])
        for k, off in enumerate(offsets):
            start = d.add(entry, normal, float(off) + 0.02 * (k % 2))
            tip = d.add(d.add(head, normal, float(off) * 0.9), direction, 0.5 * a["head_r"])
            metal += d.threaded_rod(u, v, start, tip, 0.017, thread_from=0.7, pitch=0.02)
            metal += d.rod(u, v, start, d.add(start, direction, 0.015), 0.03)
    elif label == 3:  # hemiarthroplasty: stem + large head, no cup
        metal += _stem(u, v, a, pts) + d.disk(u, v, head, a["head_r"] * a["head_scale"])
    elif label == 4:  # total hip: stem + small head + cup shell (+ cup screws)
        metal += _stem(u, v, a, pts) + d.disk(u, v, head, a["tha_head"])
        r_out = a["tha_head"] + 0.07
        shell = d.chord(np.hypot(u - head[0], v - head[1]), r_out) - d.chord(
            np.hypot(u - head[0], v - head[1]), r_out - 0.025
        )
        cup_dir = float(np.arctan2(direction[1], direction[0])) - 0.5
        metal += 0.8 * np.clip(shell, 0, None) * d.arc_mask(u, v, head, cup_dir, 1.5)
        for k in range(a["cup_screws"]):
            ang = cup_dir + (k - 0.5) * 0.5
            p0 = d.add(head, (np.cos(ang), np.sin(ang)), r_out)
            metal += d.rod(u, v, p0, d.add(head, (np.cos(ang), np.sin(ang)), r_out + 0.2), 0.012)
    else:  # plate and screws on the shaft, sometimes with the fracture still visible
        top = (xs + half + plate_w, a["plate_top"])
        bottom = (top[0], a["plate_top"] + a["plate_len"] + 0.3)
        metal += d.rod(u, v, top, bottom, plate_w) * 1.2
        n = a["n_screws"] + 3
        for k in range(n):
            y = top[1] + 0.05 + k * (bottom[1] - top[1] - 0.1) / max(n - 1, 1)
            metal += d.threaded_rod(
                u, v, (top[0], y), (xs - half - 0.02, y), 0.013, thread_from=0.3
            )
        if a["shaft_fracture"]:
            prof, _ = d.line_profile(u, v, (xs, top[1] + 0.4), 0.5, 0.015)
            signal = signal * (1.0 - 0.5 * prof * (np.abs(u - xs) < half))
    signal = signal + a["metal"] * metal
    device = (metal > 0.05 * max(float(metal.max()), 1e-6)).astype(np.float32)  # all metal
    return Rendered(signal.astype(np.float32), 1.0 if not lateral else 0.7, device)


# --------------------------------------------------------------------------- vertebral fracture


def vcf_anatomy(rng: np.random.Generator, label: int) -> Anatomy:
    strength = rng.uniform(0.25, 1.0)
    return {
        "xc": rng.uniform(-0.1, 0.1),
        "curve": rng.uniform(-0.15, 0.15),
        "height": rng.uniform(0.24, 0.3),
        "gap": rng.uniform(0.07, 0.1),
        "depth": rng.uniform(0.38, 0.48),
        "index": int(rng.integers(1, 4)),
        "offset": rng.uniform(-0.15, 0.15),
        "ratio": rng.uniform(0.5, 0.82),
        "mobility": rng.uniform(0.08, 0.2) * strength,
        "strength": strength,
        "density": rng.uniform(0.6, 1.0),
        "adjacent_wedge": rng.uniform(0.85, 1.0),
        "aorta": rng.random() < 0.4,
    }


def _vertebra(
    u: np.ndarray,
    v: np.ndarray,
    centre: d.Point,
    depth: float,
    height: float,
    anterior_ratio: float,
    rim: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Body and cortical rim of a vertebra seen from the side; anterior is to the left."""
    frac = np.clip((u - (centre[0] - depth / 2)) / depth, 0, 1)
    half_h = height / 2 * (anterior_ratio + (1 - anterior_ratio) * frac)
    body = d.smooth_box(u, v, centre, (depth / 2, half_h), 0.01)
    inner = d.smooth_box(u, v, centre, (depth / 2 - 0.025, half_h - 0.022), 0.01)
    return body, rim * np.clip(body - inner, 0, None)


def vcf_render(
    anatomy: Anatomy, label: int, view: str, rng: np.random.Generator, size: int
) -> Rendered:
    u, v = d.grid(size)
    a = anatomy
    step = a["height"] + a["gap"]
    signal = 0.2 * d.chord(np.abs(u - a["xc"]), 0.95)
    texture = d.smooth_noise(rng, u.shape, size / 80.0)
    fresh = label == 1
    for k in range(5):
        cy = (k - 2) * step + a["offset"]
        cx = a["xc"] + a["curve"] * cy * cy
        ratio, rim = 1.0, 0.55
        if k == a["index"]:
            ratio = a["ratio"]
            if fresh and view == "lateral_standing":
                ratio = max(0.35, ratio - a["mobility"])
            rim = 0.35 if fresh else 0.55 + 0.4 * a["strength"]
        elif abs(k - a["index"]) == 1:
            ratio = a["adjacent_wedge"]
        body, cortex = _vertebra(u, v, (cx, cy), a["depth"], a["height"], ratio, rim)
        signal = signal + a["density"] * (0.45 * body * (1 + 0.25 * texture) + cortex)
        posterior = d.rod(
            u, v, (cx + a["depth"] / 2, cy - 0.05), (cx + a["depth"] / 2 + 0.25, cy + 0.05), 0.045
        )
        signal = signal + 0.35 * a["density"] * posterior
        if k == a["index"]:
            top = cy - a["height"] / 2 * ratio
            front = cx - a["depth"] / 2
            if fresh:
                band, _ = d.line_profile(u, v, (cx, top + 0.04), 0.0, 0.018)
                signal = signal + 0.45 * a["strength"] * band * body
                buckle = d.gauss_blob(u, v, (front - 0.015, cy), (0.018, 0.035))
                signal = signal + 0.5 * a["strength"] * buckle
            else:
                for sign in (-1, 1):
                    beak = d.gauss_blob(
                        u, v, (front - 0.02, cy + sign * a["height"] / 2 * ratio), (0.025, 0.012)
                    )
                    signal = signal + 0.6 * a["strength"] * beak
    if a["aorta"]:
        prof, _ = d.line_profile(u, v, (a["xc"] - a["depth"] - 0.1, 0.0), np.pi / 2, 0.008)
        dots = (np.sin(v * 35 + rng.uniform(0, 6)) > 0.2).astype(np.float32)
        signal = signal + 0.3 * prof * dots
    return Rendered(signal.astype(np.float32), float(a["strength"]))


# --------------------------------------------------------------------------- dislocation

# joint: (socket radius factor, socket half-span, socket facing, shaft angle, displacement dir)
_JOINTS: dict[str, tuple[float, float, float, float, tuple[float, float]]] = {
    "shoulder": (1.05, 0.7, np.pi, 1.75, (-0.75, 0.65)),
    "elbow": (1.1, 1.6, 0.5, -1.9, (0.7, -0.7)),
    "hip": (1.08, 1.35, -2.3, 1.1, (0.35, -0.95)),
    "tha": (1.25, 1.45, -2.3, 1.1, (0.35, -0.95)),
}


def dislocation_anatomy(rng: np.random.Generator, label: int) -> Anatomy:
    subtle = rng.random() < 0.3
    return {
        "centre": (rng.uniform(-0.15, 0.15), rng.uniform(-0.15, 0.15)),
        "head_r": rng.uniform(0.14, 0.2),
        "density": rng.uniform(0.8, 1.2),
        "disp": rng.uniform(0.45, 0.8) if subtle else rng.uniform(0.85, 1.7),
        "normal_disp": rng.uniform(0.0, 0.12),
        "jitter": rng.uniform(-0.4, 0.4),
        "rotation": rng.uniform(-0.3, 0.3),
    }


def dislocation_render(
    anatomy: Anatomy, label: int, view: str, rng: np.random.Generator, size: int
) -> Rendered:
    u, v = d.grid(size)
    a = anatomy
    socket_f, half_span, facing, shaft_angle, disp_dir = _JOINTS.get(view, _JOINTS["hip"])
    r = a["head_r"]
    socket = a["centre"]
    amount = a["disp"] if label == 1 else a["normal_disp"]
    direction = d.rotate_point(disp_dir, a["jitter"] * 0.5)
    head = d.add(socket, direction, amount * r * 2.0)
    shaft_dir = (
        float(np.cos(shaft_angle + a["rotation"])),
        float(np.sin(shaft_angle + a["rotation"])),
    )
    shaft_end = d.add(head, shaft_dir, 1.6)
    metal = view == "tha"
    dens = a["density"]
    signal = 0.2 * d.chord(np.hypot(u - socket[0], v - socket[1]) * 0.6, 1.2)
    socket_body = d.gauss_blob(
        u, v, d.add(socket, (np.cos(facing), np.sin(facing)), r * 1.8), (0.45, 0.4)
    )
    rim = d.ring(u, v, socket, r * socket_f, 0.014) * d.arc_mask(u, v, socket, facing, half_span)
    signal = signal + dens * (0.45 * socket_body + 0.5 * rim)
    shaft = d.tapered_rod(u, v, head, shaft_end, r * 0.7, r * 0.55)
    inner = d.tapered_rod(u, v, d.add(head, shaft_dir, r), shaft_end, r * 0.4, r * 0.35)
    signal = signal + dens * (shaft - 0.6 * inner)
    if metal:
        cup = d.chord(np.hypot(u - socket[0], v - socket[1]), r * socket_f + 0.03) - d.chord(
            np.hypot(u - socket[0], v - socket[1]), r * socket_f
        )
        signal = signal + 3.0 * np.clip(cup, 0, None) * d.arc_mask(u, v, socket, facing, half_span)
        signal = signal + 3.0 * (
            d.disk(u, v, head, r * 0.8)
            + d.tapered_rod(u, v, head, d.add(head, shaft_dir, 0.8), 0.05, 0.02)
        )
    else:
        signal = signal + dens * d.disk(u, v, head, r)
    if view == "elbow":
        radius_start = d.add(head, (0.1, 0.25), 1.0)
        signal = signal + 0.7 * dens * d.rod(
            u, v, radius_start, d.add(radius_start, (0.3, 1.0), 1.2), 0.06
        )
    visibility = float(np.clip(amount / 1.2, 0, 1)) if label == 1 else float(a["normal_disp"] * 3)
    lesion = None
    if label == 1:  # the empty socket and the displaced head: where a reader sees it
        on_head = np.hypot(u - head[0], v - head[1]) <= r
        on_socket = np.hypot(u - socket[0], v - socket[1]) <= r * socket_f
        lesion = (on_head | on_socket).astype(np.float32)
    return Rendered(signal.astype(np.float32), visibility, lesion)
