"""Lesions: masses and calcification clusters, placed in breast millimetres, drawn on the detector grid.

:func:`sample_lesion` places a lesion so that it fits inside the breast (and outside the muscle) in
both views; :func:`draw_lesions` adds each lesion's attenuation (:func:`lesion_patch`) on the
detector grid, so calcifications stay crisp at every pixel spacing, and boxes what was drawn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mammodg.phantom.anatomy import Breast, Geometry

# BI-RADS categories drawn for a lesion and their probabilities
_MAL_BIRADS = (("4B", "4C", "5"), (0.3, 0.3, 0.4))
_BEN_BIRADS = (("2", "3", "4A"), (0.5, 0.35, 0.15))


@dataclass
class Lesion:
    """A lesion in breast coordinates (mm).

    ``center_mm = (x, y)``: x = depth from the chest wall along the nipple axis in the CC view,
    y = offset from the nipple line in the CC view (+ = toward the image bottom). In the MLO view
    the lesion keeps its distance from the nipple along the axis (x + mlo_depth - depth) and sits
    ``mlo_offset_mm`` from the nipple line. ``shape_seed`` fixes the shape details.
    """

    kind: str  # "mass" | "calcification"
    malignant: bool
    center_mm: tuple[float, float]
    radius_mm: float
    birads: str
    mlo_offset_mm: float = 0.0
    shape_seed: int = 0

    @property
    def lesion_class(self) -> str:
        kind = "mass" if self.kind == "mass" else "calc"
        return f"{'malignant' if self.malignant else 'benign'}_{kind}"


def sample_lesion(rng, geoms, breast: Breast, kind: str, malignant: bool) -> Lesion | None:
    """A ``kind`` lesion ("mass" | "calcification") of ``breast`` that fits in both ``geoms``
    (CC, MLO :class:`~mammodg.phantom.anatomy.Geometry`), or None after 300 tries (half of them
    at 0.7 times the size).
    """
    cc, mlo = geoms
    if kind == "mass":
        radius = rng.uniform(6.0, 13.0) if malignant else rng.uniform(4.5, 10.0)
        ext = radius * (1.9 if malignant else 1.1)
    else:
        radius = rng.uniform(3.5, 7.0) if malignant else rng.uniform(6.0, 13.0)
        ext = radius + 1.5
    labels, probs = _MAL_BIRADS if malignant else _BEN_BIRADS
    birads = str(rng.choice(labels, p=probs))
    seed = int(rng.integers(2**31 - 1))
    for attempt in range(300):
        if attempt == 150:
            ext *= 0.7
            radius *= 0.7
        x = rng.uniform(0.22, 0.85) * breast.depth_mm
        y = rng.uniform(-0.6, 0.6) * min(cc.h_up, cc.h_dn)
        si = rng.uniform(-0.55, 0.55) * min(mlo.h_up, mlo.h_dn)
        les = Lesion(kind, bool(malignant), (float(x), float(y)), float(radius), birads, float(si), seed)
        if all(g.fits(*g.lesion_center(les, breast.depth_mm, breast.cc_offset_mm), ext) for g in geoms):
            return les
    return None


def _seg_dist(px, py, sx, sy, ex, ey):
    """Distance from points (px, py) [...,] to segments s->e [n] -> array [n, ...] plus t in [0,1]."""
    dx, dy = ex - sx, ey - sy
    ll = dx * dx + dy * dy
    ll = np.where(ll < 1e-12, 1.0, ll)
    t = ((px[None] - sx[:, None, None]) * dx[:, None, None] + (py[None] - sy[:, None, None]) * dy[:, None, None])
    t = np.clip(t / ll[:, None, None], 0, 1)
    qx = sx[:, None, None] + t * dx[:, None, None] - px[None]
    qy = sy[:, None, None] + t * dy[:, None, None] - py[None]
    return np.sqrt(qx * qx + qy * qy), t


def lesion_patch(les: Lesion, du, dv, eff: float, rot: float):
    """Attenuation a lesion adds on a patch; ``du``/``dv`` are mm offsets from the lesion centre,
    ``eff`` the detector pixel size (mm), ``rot`` the view's extra rotation of the shape.

    Benign masses are circumscribed ellipses, malignant ones irregular with an indistinct margin and
    spicules; benign calcifications are a few coarse dots, malignant ones a pleomorphic cluster of
    dots and short linear forms, mostly along 1-3 branches.
    """
    rng = np.random.default_rng([int(les.shape_seed), 5])
    phi = rng.uniform(0, np.pi) + rot
    c, s = math.cos(phi), math.sin(phi)
    x = du * c + dv * s
    y = -du * s + dv * c
    r = les.radius_mm
    if les.kind == "mass":
        if not les.malignant:
            aspect = rng.uniform(0.65, 1.0)
            amp = rng.uniform(0.5, 0.72)
            rho2 = (x / r) ** 2 + (y / (r * aspect)) ** 2
            body = np.sqrt(np.clip(1 - rho2, 0, 1))
            # circumscribed but anti-aliased margin
            rim = np.clip((1 - np.sqrt(rho2)) * r / max(eff, 0.15), 0, 1)
            return (amp * (0.35 * rim + 0.65 * body)).astype(np.float32)
        amp = rng.uniform(0.95, 1.25)
        th = np.arctan2(y, x)
        rr = np.sqrt(x * x + y * y)
        ks = np.arange(2, 8)
        ak = rng.normal(0, 0.11, size=ks.size) / np.sqrt(ks / 2.0)
        pk = rng.uniform(0, 2 * np.pi, size=ks.size)
        rth = r * (1 + np.tensordot(ak, np.cos(ks[:, None, None] * th[None] + pk[:, None, None]), axes=1))
        rth = np.maximum(rth, 0.35 * r)
        rho = rr / rth
        body = np.sqrt(np.clip(1 - rho ** 2, 0, 1))
        margin = 1.0 / (1.0 + np.exp(-(1 - rho) / 0.07))  # indistinct margin
        val = amp * (0.55 * body + 0.45 * margin)
        n = int(rng.integers(10, 24))
        ang = rng.uniform(0, 2 * np.pi, size=n).astype(np.float32)
        length = (r * rng.uniform(0.7, 1.7, size=n)).astype(np.float32)
        width = np.maximum(rng.uniform(0.25, 0.55, size=n), 0.45 * eff).astype(np.float32)
        start = np.float32(0.7 * r)
        xf, yf = x.astype(np.float32), y.astype(np.float32)
        spic = np.zeros(x.shape, np.float32)
        for j in range(n):  # radial spicules: distance to the ray at angle ang[j]
            ca, sa = math.cos(ang[j]), math.sin(ang[j])
            along = xf * np.float32(ca) + yf * np.float32(sa) - start
            perp = xf * np.float32(sa) - yf * np.float32(ca)
            fade = np.clip(1 - along / length[j], 0, 1) * (along > 0)
            np.maximum(spic, fade * np.exp(-0.5 * (perp / width[j]) ** 2), out=spic)
        val = np.maximum(val, amp * 0.55 * spic)
        return val.astype(np.float32)

    # calcification cluster
    if les.malignant:
        n = int(rng.integers(14, 36))
        n_br = int(rng.integers(1, 4))
        br_ang = rng.uniform(0, 2 * np.pi, size=n_br)
        which = rng.integers(0, n_br + 1, size=n)  # n_br = loose cluster
        tpos = rng.uniform(-1, 1, size=n) * r
        cx = np.where(which < n_br, tpos * np.cos(br_ang[np.minimum(which, n_br - 1)]), 0)
        cy = np.where(which < n_br, tpos * np.sin(br_ang[np.minimum(which, n_br - 1)]), 0)
        cx = cx + rng.normal(0, 0.25 * r, size=n) * np.where(which < n_br, 0.3, 1.0)
        cy = cy + rng.normal(0, 0.25 * r, size=n) * np.where(which < n_br, 0.3, 1.0)
        rad = rng.uniform(0.08, 0.25, size=n)  # pleomorphic: tiny dots and short linear forms
        seg_len = np.where(rng.random(n) < 0.45, rng.uniform(0.4, 1.6, size=n), 0.0)
        seg_ang = np.where(which < n_br, br_ang[np.minimum(which, n_br - 1)], rng.uniform(0, np.pi, size=n))
        seg_ang = seg_ang + rng.normal(0, 0.3, size=n)
        amp = rng.uniform(1.3, 2.2, size=n)
    else:
        n = int(rng.integers(3, 10))
        rr = r * np.sqrt(rng.uniform(0, 1, size=n))
        aa = rng.uniform(0, 2 * np.pi, size=n)
        cx, cy = rr * np.cos(aa), rr * np.sin(aa)
        rad = rng.uniform(0.3, 0.8, size=n)
        seg_len = np.zeros(n)
        seg_ang = np.zeros(n)
        amp = rng.uniform(1.2, 1.9, size=n)
    sx = cx - 0.5 * seg_len * np.cos(seg_ang)
    sy = cy - 0.5 * seg_len * np.sin(seg_ang)
    ex = cx + 0.5 * seg_len * np.cos(seg_ang)
    ey = cy + 0.5 * seg_len * np.sin(seg_ang)
    d, _ = _seg_dist(x, y, sx, sy, ex, ey)
    rad_px = rad / eff
    cov = np.clip(rad_px[:, None, None] + 0.5 - d / eff, 0, 1)  # never vanishes below a pixel
    return (amp[:, None, None] * cov).max(axis=0).astype(np.float32)


def lesion_extent_mm(les: Lesion) -> float:
    """Half-width (mm) of the patch that holds everything :func:`lesion_patch` draws."""
    if les.kind == "mass":
        return les.radius_mm * (2.6 if les.malignant else 1.05) + 1.0
    return les.radius_mm * 1.6 + 2.5


def draw_lesions(A: np.ndarray, breast: Breast, geom: Geometry, eff: float) -> list[dict]:
    """Add the lesions of ``breast`` to ``A``, its attenuation map on a detector grid of ``eff`` mm
    pixels (chest wall at column 0), in place.

    Returns one dict per visible lesion, ``{"box": (x_min, y_min, x_max, y_max), "lesion_class",
    "birads"}``: the box of what was drawn (above 20 % of a mass's peak, 30 % of a calcification
    cluster's), in stored-pixel coordinates, mirrored for right breasts as the image will be.
    """
    rows, cols = A.shape
    boxes = []
    for les in breast.lesions:
        uc, vc = geom.lesion_center(les, breast.depth_mm, breast.cc_offset_mm)
        col_c = uc / eff - 0.5
        row_c = (vc + rows * eff / 2.0) / eff - 0.5
        ext = lesion_extent_mm(les) / eff
        r0, r1 = max(int(math.floor(row_c - ext)), 0), min(int(math.ceil(row_c + ext)) + 1, rows)
        c0, c1 = max(int(math.floor(col_c - ext)), 0), min(int(math.ceil(col_c + ext)) + 1, cols)
        if r1 <= r0 or c1 <= c0:
            continue
        dv = ((np.arange(r0, r1, dtype=np.float32) - row_c) * eff)[:, None]
        du = ((np.arange(c0, c1, dtype=np.float32) - col_c) * eff)[None, :]
        du, dv = np.broadcast_arrays(du, dv)
        patch = lesion_patch(les, du, dv, eff, geom.rot)
        patch = patch * (A[r0:r1, c0:c1] > 0.5)  # only inside the breast
        peak = float(patch.max()) if patch.size else 0.0
        if peak <= 0:
            continue
        A[r0:r1, c0:c1] += patch
        thr = (0.2 if les.kind == "mass" else 0.3) * peak
        rr, cc = np.nonzero(patch > thr)
        if rr.size == 0:
            continue
        x0, x1 = float(c0 + cc.min()), float(c0 + cc.max() + 1)
        y0, y1 = float(r0 + rr.min()), float(r0 + rr.max() + 1)
        if breast.laterality == "R":
            x0, x1 = cols - x1, cols - x0
        boxes.append({"box": (x0, y0, x1, y1), "lesion_class": les.lesion_class, "birads": les.birads})
    return boxes
