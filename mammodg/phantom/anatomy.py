"""Anatomy: one breast in physical millimetres, the same in every vendor style.

Breast coordinates are ``u`` (mm from the chest wall toward the nipple) and ``v`` (mm, downward,
0 = vertical centre of the detector field). :class:`Geometry` is the outline (two superellipse
halves meeting at the nipple), the pectoral muscle (MLO) or an optional muscle sliver (CC) of one
view; :func:`sample_patient` draws both breasts of a patient with their lesions, and
:func:`landmarks` gives the true nipple and chest wall of a rendered image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mammodg.phantom.lesions import Lesion, sample_lesion
from mammodg.phantom.styles import FIELD_MM, Style

# mean fibroglandular fraction of BI-RADS density A..D
_GLAND_FRACTION = (0.07, 0.22, 0.45, 0.70)


@dataclass
class Breast:
    """One breast of a phantom patient; all sizes in mm, independent of any style."""

    patient_index: int
    laterality: str  # "L" | "R"
    density: int  # 1..4 = BI-RADS A..D
    lesions: list[Lesion] = field(default_factory=list)
    # CC view shape: nipple at (depth_mm, cc_offset_mm); superellipse half heights above/below.
    depth_mm: float = 95.0
    half_height_mm: float = 90.0
    cc_asym: float = 1.0
    cc_offset_mm: float = 0.0
    cc_shape_exp: float = 2.2
    cc_sliver: tuple[float, float, float] | None = None  # (width, half height, v centre) of muscle
    # MLO view shape: nipple at (mlo_depth_mm, mlo_nipple_mm); breast runs off the top (axilla).
    mlo_depth_mm: float = 105.0
    mlo_nipple_mm: float = 20.0
    mlo_upper_mm: float = 180.0
    mlo_lower_mm: float = 80.0
    mlo_shape_exp_up: float = 1.7
    mlo_shape_exp_dn: float = 2.1
    pec_width_mm: float = 55.0  # pectoral muscle width along the top edge
    pec_height_mm: float = 130.0  # pectoral muscle length down the chest wall
    pec_exp: float = 1.15  # 1 = straight muscle edge, > 1 convex
    nipple_radius_mm: float = 4.5
    falloff_mm: float = 16.0  # width of the thickness falloff at the skin line
    gland_fraction: float = 0.3  # fraction of the breast that is fibroglandular
    texture_seed: int = 0

    @property
    def density_letter(self) -> str:
        return "ABCD"[int(self.density) - 1]

    @property
    def label(self) -> int:
        return int(any(les.malignant for les in self.lesions))


class Geometry:
    """Breast outline and muscle of one view, in breast millimetres (chest wall at u = 0).

    Nipple at (``D``, ``vn``); half heights ``h_up``/``h_dn`` and exponents ``p_up``/``p_dn`` of the
    outline above/below it; ``pec`` = (width, height, exponent) of the MLO pectoral muscle, ``sliver``
    = (width, half height, v centre) of the optional CC muscle sliver; ``rot`` turns lesion shapes.
    """

    def __init__(self, breast: Breast, view: str):
        self.view = view
        if view == "CC":
            h = breast.half_height_mm
            self.D = breast.depth_mm
            self.vn = breast.cc_offset_mm
            self.h_up, self.h_dn = h * breast.cc_asym, h / breast.cc_asym
            self.p_up = self.p_dn = breast.cc_shape_exp
            self.pec = None
            self.sliver = breast.cc_sliver
            self.rot = 0.0
        elif view == "MLO":
            self.D = breast.mlo_depth_mm
            self.vn = breast.mlo_nipple_mm
            self.h_up, self.h_dn = breast.mlo_upper_mm, breast.mlo_lower_mm
            self.p_up, self.p_dn = breast.mlo_shape_exp_up, breast.mlo_shape_exp_dn
            self.pec = (breast.pec_width_mm, breast.pec_height_mm, breast.pec_exp)
            self.sliver = None
            self.rot = 0.6
        else:
            raise ValueError(f"view must be 'CC' or 'MLO', got {view!r}")
        self.nip_r = breast.nipple_radius_mm
        self.falloff = breast.falloff_mm
        self.v_top = -FIELD_MM[0] / 2.0

    # --- outline -------------------------------------------------------------------------------
    def rho(self, u, v):
        """Normalised superellipse radius (< 1 inside the breast); scalar or broadcast arrays."""
        u = np.maximum(np.asarray(u, dtype=np.float64), 0.0)
        dv = np.asarray(v, dtype=np.float64) - self.vn
        up = dv < 0
        h = np.where(up, self.h_up, self.h_dn)
        p = np.where(up, self.p_up, self.p_dn)
        return ((u / self.D) ** p + (np.abs(dv) / h) ** p) ** (1.0 / p)

    def muscle_rho(self, u, v):
        """Normalised pectoral / sliver radius (< 1 inside the muscle); inf where none."""
        u = np.asarray(u, dtype=np.float64)
        v = np.asarray(v, dtype=np.float64)
        if self.pec is not None:
            w, hs, q = self.pec
            return ((np.maximum(u, 0) / w) ** q + (np.maximum(v - self.v_top, 0) / hs) ** q) ** (1 / q)
        if self.sliver is not None:
            w, hh, vc = self.sliver
            return np.sqrt((np.maximum(u, 0) / w) ** 2 + ((v - vc) / hh) ** 2)
        return np.full(np.broadcast(u, v).shape, np.inf)

    def lesion_center(self, les: Lesion, depth_cc: float, nipple_v_cc: float) -> tuple[float, float]:
        """(u, v) of ``les`` in this view, given the CC view's nipple (depth, v)."""
        x, y = les.center_mm
        if self.view == "CC":
            return float(x), float(nipple_v_cc + y)
        return float(x + (self.D - depth_cc)), float(self.vn + les.mlo_offset_mm)

    def fits(self, u: float, v: float, radius: float) -> bool:
        """Whether a disc of ``radius`` at (u, v) lies inside the field and the breast, off the muscle."""
        ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        pu = np.concatenate([[u], u + radius * np.cos(ang)])
        pv = np.concatenate([[v], v + radius * np.sin(ang)])
        if np.any(pu < 4.0) or np.any(np.abs(pv) > FIELD_MM[0] / 2 - 4) or np.any(pu > FIELD_MM[1] - 4):
            return False
        if np.any(self.rho(pu, pv) > 0.93) or np.any(self.muscle_rho(pu, pv) < 1.15):
            return False
        return True

    # --- canvas maps ---------------------------------------------------------------------------
    def thickness_and_edge(self, u, v):
        """(thickness in [0, 1], distance to skin line in mm) on a grid (u row-vector, v column)."""
        H, W = v.shape[0], u.shape[1]
        thick = np.zeros((H, W), np.float32)
        dist = np.zeros((H, W), np.float32)
        uu = np.maximum(u, 1e-3).astype(np.float32)
        split = int(np.searchsorted(v[:, 0], self.vn))
        for sl, h, p in ((slice(0, split), self.h_up, self.p_up), (slice(split, H), self.h_dn, self.p_dn)):
            vv = v[sl]
            if vv.shape[0] == 0:
                continue
            a = uu / np.float32(self.D)
            b = np.maximum(np.abs(vv - self.vn), 1e-3).astype(np.float32) / np.float32(h)
            ap = a ** np.float32(p)
            bp = b ** np.float32(p)
            s = ap + bp
            rho = s ** np.float32(1.0 / p)
            grad = (rho / s) * np.sqrt((ap / (a * self.D)) ** 2 + (bp / (b * h)) ** 2)
            d = np.where(rho < 1, (1 - rho) / np.maximum(grad, 1e-6), 0).astype(np.float32)
            dist[sl] = d
            x = np.clip(d / self.falloff, 0, 1)
            thick[sl] = np.sqrt(1 - (1 - x) ** 2)
        # nipple bump at the apex
        dn2 = (u - self.D) ** 2 + (v - self.vn) ** 2
        tn = 0.55 * np.sqrt(np.clip(1 - dn2 / self.nip_r ** 2, 0, 1)).astype(np.float32)
        thick = np.maximum(thick, tn)
        return thick, dist


def _sample_breast(rng, patient_index: int, laterality: str, density: int, size: float) -> Breast:
    j = lambda s: float(rng.normal(1.0, s))  # noqa: E731 - small multiplicative jitter
    depth = float(np.clip((62 + 55 * size) * j(0.04), 55, 125))
    half_h = float(np.clip((74 + 28 * size) * j(0.03), 65, 104))
    asym = float(rng.uniform(0.92, 1.08))
    cc_off = float(rng.uniform(-8, 8))
    # keep the CC outline inside the field
    lim = FIELD_MM[0] / 2 - 5 - abs(cc_off)
    half_h = min(half_h, lim * min(asym, 1 / asym))
    sliver = None
    if rng.random() < 0.3:
        sliver = (float(rng.uniform(4, 11)), float(rng.uniform(18, 40)), float(rng.uniform(-25, 25)))
    mlo_depth = float(min(depth * rng.uniform(1.03, 1.15), 150))
    vn = float(rng.uniform(12, 35))
    dist_top = FIELD_MM[0] / 2 + vn
    mlo_up = float(dist_top * rng.uniform(1.18, 1.45))
    p_up = float(rng.uniform(1.5, 2.0))
    b = dist_top / mlo_up
    u_top = mlo_depth * (1 - b ** p_up) ** (1 / p_up)
    mlo_dn = float(min(half_h * rng.uniform(0.8, 1.0), FIELD_MM[0] / 2 - 6 - vn))
    pec_w = float(np.clip(u_top * rng.uniform(0.45, 0.8), 20, 100))
    pec_h = float(np.clip(rng.uniform(0.65, 1.05) * dist_top, 70, dist_top + 10))
    return Breast(
        patient_index=int(patient_index),
        laterality=laterality,
        density=int(density),
        lesions=[],
        depth_mm=depth,
        half_height_mm=half_h,
        cc_asym=asym,
        cc_offset_mm=cc_off,
        cc_shape_exp=float(rng.uniform(1.8, 2.3)),
        cc_sliver=sliver,
        mlo_depth_mm=mlo_depth,
        mlo_nipple_mm=vn,
        mlo_upper_mm=mlo_up,
        mlo_lower_mm=mlo_dn,
        mlo_shape_exp_up=p_up,
        mlo_shape_exp_dn=float(rng.uniform(1.8, 2.4)),
        pec_width_mm=pec_w,
        pec_height_mm=pec_h,
        pec_exp=float(rng.uniform(1.0, 1.35)),
        nipple_radius_mm=float(rng.uniform(3.5, 6.0)),
        falloff_mm=float(rng.uniform(12, 22)),
        gland_fraction=float(np.clip(_GLAND_FRACTION[density - 1] + rng.uniform(-0.04, 0.04), 0.03, 0.85)),
        texture_seed=int(rng.integers(2**31 - 1)),
    )


def sample_patient(rng: np.random.Generator, patient_index: int) -> list[Breast]:
    """Left and right breast of one patient (in that order), drawn from ``rng``.

    About 35 % of patients get one malignant lesion (mass 65 %, calcification cluster 35 %) in one
    breast; every breast may carry benign lesions. Density (1..4) is shared by both breasts.
    """
    density = int(rng.choice([1, 2, 3, 4], p=[0.12, 0.38, 0.38, 0.12]))
    size = float(rng.uniform(0, 1))
    breasts = [_sample_breast(rng, patient_index, lat, density, size) for lat in ("L", "R")]
    malignant_side = int(rng.integers(2)) if rng.random() < 0.35 else -1
    for side, br in enumerate(breasts):
        geoms = (Geometry(br, "CC"), Geometry(br, "MLO"))
        wanted: list[tuple[str, bool]] = []
        if side == malignant_side:
            wanted.append(("mass" if rng.random() < 0.65 else "calcification", True))
            if rng.random() < 0.2:
                wanted.append(("mass" if rng.random() < 0.6 else "calcification", False))
        else:
            n_benign = int(rng.choice([0, 1, 2], p=[0.6, 0.3, 0.1]))
            wanted += [("mass" if rng.random() < 0.6 else "calcification", False) for _ in range(n_benign)]
        for kind, mal in wanted:
            les = sample_lesion(rng, geoms, br, kind, mal)
            if les is not None:
                br.lesions.append(les)
            elif mal:  # extremely unlikely; keep the label honest by retrying with a mass
                les = sample_lesion(rng, geoms, br, "mass", True)
                if les is not None:
                    br.lesions.append(les)
    return breasts


def landmarks(breast: Breast, view: str, style: Style, *, scale: float = 1.0) -> dict:
    """True landmarks of the image that :func:`~mammodg.phantom.render.render` makes of a breast view.

    Stored-pixel coordinates (x column, y row, continuous; pixel i spans [i, i + 1)), mirrored like
    the image for right breasts. ``nipple``: (x, y) of the nipple's tip, the point of the breast
    farthest from the chest wall (the nipple is a bump of ``nipple_radius_mm`` on the outline's apex).
    ``chest_wall``: two points (x, y) of a line; in CC the image edge on the chest-wall side, in MLO
    the pectoral line (the chord of the muscle edge from the top edge of the field to the chest wall).
    """
    view = view.upper()
    geom = Geometry(breast, view)
    rows, cols = style.matrix(scale)
    eff = style.pixel_spacing_mm / float(scale)

    def pixel(u: float, v: float) -> tuple[float, float]:
        x = u / eff
        return (cols - x if breast.laterality == "R" else x, v / eff + rows / 2.0)

    if view == "CC":
        wall = (pixel(0.0, -rows * eff / 2.0), pixel(0.0, rows * eff / 2.0))
    else:
        width, height, _ = geom.pec
        wall = (pixel(width, geom.v_top), pixel(0.0, geom.v_top + height))
    return {"nipple": pixel(geom.D + geom.nip_r, geom.vn), "chest_wall": wall}
