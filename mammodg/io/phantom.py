"""Synthetic, realistic-looking mammograms written as real DICOM files (Modality MG).

Used by the tests and the demos of the domain-generalisation pipeline: several "vendor" styles
render the same physical anatomy with different pixel spacing, intensity curve, contrast, noise,
sharpening, bit depth, photometric interpretation (MONOCHROME1/2) and transfer syntax.

Model
-----
* Anatomy (:class:`Breast`, :class:`Lesion`) lives in physical millimetres and does not depend on
  the style. Breast coordinates are ``u`` (mm from the chest wall toward the nipple) and ``v`` (mm,
  downward, 0 = vertical centre of the detector field).
* A smooth attenuation map (thickness falloff at the skin line, fibroglandular texture, pectoral
  muscle) is computed on a canonical grid (spacing ``0.3 mm / scale``) shared by all styles, then
  resampled onto the style's detector grid. Lesions are drawn directly on the detector grid, so
  calcifications stay crisp and bounding boxes are computed from what was actually drawn.
* The attenuation ``A`` becomes a MONOCHROME2 signal ``S = bg + (1-bg)(1-exp(-k A))`` (dense =
  bright); the style then applies gamma, contrast, unsharp masking, correlated noise, quantisation
  to ``bits_stored`` and, for MONOCHROME1, inversion of the stored values.
* Images are written chest wall on the LEFT edge for left breasts and on the RIGHT edge for right
  breasts (as real mammography DICOMs are displayed).

Entry points: :func:`default_styles`, :func:`sample_patient`, :func:`render`, :func:`write_dicom`,
:func:`make_phantoms`.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import math
import pathlib
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import fft as _sfft
from scipy import ndimage

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as _DcmSequence
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "Style",
    "Lesion",
    "Breast",
    "default_styles",
    "sample_patient",
    "render",
    "write_dicom",
    "make_phantoms",
    "MANIFEST_COLUMNS",
    "MG_FOR_PRESENTATION_SOP_CLASS",
    "LESION_CLASSES",
    "BIRADS_ORDER",
]

MG_FOR_PRESENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"
MANIFEST_COLUMNS = [
    "image_path", "patient_id", "source", "manufacturer", "view", "laterality", "label", "boxes",
    "birads", "density", "split",
]
LESION_CLASSES = ("benign_mass", "malignant_mass", "benign_calc", "malignant_calc")
BIRADS_ORDER = ("1", "2", "3", "4A", "4B", "4C", "5")
LOSSLESS_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless)

# Physical detector field (height, width) in mm and the canonical canvas that covers it.
FIELD_MM = (240.0, 192.0)
_CANVAS_V0 = -130.0  # v of the canvas top edge (mm)
_CANVAS_MM = (260.0, 210.0)  # (v span, u span)
_CANON_SPACING = 0.4  # mm at scale 1 (see _canon_spacing)
_ATT_K = 0.62  # attenuation -> signal
_SIGNAL_BG = 0.035  # MONOCHROME2 signal of the empty detector


# ----------------------------------------------------------------------------------------------
# Data classes
# ----------------------------------------------------------------------------------------------
@dataclass
class Style:
    """One acquisition "vendor" style. ``name`` is written as DICOM Manufacturer."""

    name: str
    pixel_spacing_mm: float = 0.2
    gamma: float = 1.0  # applied to the [0, 1] MONOCHROME2 signal: s ** gamma
    contrast: float = 1.0  # slope around ``pivot``
    noise_sigma: float = 0.01  # std of the additive noise (fraction of full range)
    noise_corr_px: float = 1.0  # Gaussian sigma (detector pixels) of the noise correlation
    sharpen: float = 0.0  # unsharp-mask amount
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    transfer_syntax: str = ExplicitVRLittleEndian
    model_name: str = ""
    brightness: float = 0.0  # additive offset applied with the contrast
    pivot: float = 0.45  # contrast pivot (signal level kept fixed by ``contrast``)
    sharpen_sigma_px: float = 2.5  # unsharp-mask Gaussian sigma (detector pixels)
    field_mm: tuple[float, float] = FIELD_MM  # (height, width) of the detector field
    j2k_cr: float = 10.0  # compression ratio of the lossy JPEG 2000 syntax
    window: bool = True  # write WindowCenter / WindowWidth spanning the full range

    @property
    def max_value(self) -> int:
        return (1 << int(self.bits_stored)) - 1

    def matrix(self, scale: float = 1.0) -> tuple[int, int]:
        """(rows, columns) of this style's images at ``scale``."""
        sp = self.pixel_spacing_mm / scale
        return (max(8, int(round(self.field_mm[0] / sp))), max(8, int(round(self.field_mm[1] / sp))))


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


# ----------------------------------------------------------------------------------------------
# Styles
# ----------------------------------------------------------------------------------------------
_BASE_STYLES = [
    dict(pixel_spacing_mm=0.200, gamma=1.00, contrast=1.00, noise_sigma=0.010, noise_corr_px=0.8,
         sharpen=0.30, photometric="MONOCHROME2", bits_stored=12,
         transfer_syntax=ExplicitVRLittleEndian, model_name="Phantom Mammo 2000"),
    dict(pixel_spacing_mm=0.175, gamma=0.80, contrast=1.20, noise_sigma=0.014, noise_corr_px=1.6,
         sharpen=0.90, photometric="MONOCHROME1", bits_stored=14, transfer_syntax=RLELossless,
         model_name="Senograph Phantom", brightness=-0.02),
    dict(pixel_spacing_mm=0.215, gamma=1.30, contrast=0.85, noise_sigma=0.020, noise_corr_px=0.5,
         sharpen=0.00, photometric="MONOCHROME2", bits_stored=12, transfer_syntax=JPEG2000Lossless,
         model_name="Mammomat Phantom", brightness=0.03),
    dict(pixel_spacing_mm=0.185, gamma=1.10, contrast=1.10, noise_sigma=0.008, noise_corr_px=2.5,
         sharpen=1.40, photometric="MONOCHROME2", bits_stored=16, transfer_syntax=JPEGLSLossless,
         model_name="Amulet Phantom", sharpen_sigma_px=4.0),
    dict(pixel_spacing_mm=0.210, gamma=0.90, contrast=0.95, noise_sigma=0.012, noise_corr_px=1.0,
         sharpen=0.50, photometric="MONOCHROME1", bits_stored=10, transfer_syntax=JPEG2000,
         model_name="Selenia Phantom", j2k_cr=8.0),
]
_SYNTAX_CYCLE = [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEG2000]


def _style_name(i: int) -> str:
    return f"Vendor{chr(ord('A') + i)}" if i < 26 else f"Vendor{i + 1}"


def default_styles(k: int) -> list[Style]:
    """``k`` distinct vendor styles (deterministic).

    The first five are hand-made: transfer syntaxes cycle Explicit VR Little Endian, RLE Lossless,
    JPEG 2000 Lossless, JPEG-LS Lossless, JPEG 2000 (lossy); VendorB and VendorE are MONOCHROME1;
    pixel spacing 0.175-0.215 mm (1116-1371 rows at scale 1); bits stored 10/12/14/16. Further styles
    are random perturbations with the syntaxes cycling on.
    """
    if int(k) < 1:
        raise ValueError("k must be >= 1")
    styles = []
    for i in range(int(k)):
        if i < len(_BASE_STYLES):
            params = dict(_BASE_STYLES[i])
        else:
            r = np.random.default_rng([20240607, i])
            params = dict(
                pixel_spacing_mm=float(np.round(r.uniform(0.175, 0.22), 3)),
                gamma=float(np.round(r.uniform(0.75, 1.35), 3)),
                contrast=float(np.round(r.uniform(0.8, 1.25), 3)),
                noise_sigma=float(np.round(r.uniform(0.006, 0.022), 4)),
                noise_corr_px=float(np.round(r.uniform(0.5, 2.5), 2)),
                sharpen=float(np.round(r.uniform(0.0, 1.4), 2)),
                photometric="MONOCHROME1" if r.random() < 0.35 else "MONOCHROME2",
                bits_stored=int(r.choice([10, 12, 14, 16])),
                transfer_syntax=_SYNTAX_CYCLE[i % len(_SYNTAX_CYCLE)],
                model_name=f"Phantom Model {i + 1}",
                brightness=float(np.round(r.uniform(-0.03, 0.03), 3)),
            )
        styles.append(Style(name=_style_name(i), **params))
    return styles


# ----------------------------------------------------------------------------------------------
# Patients
# ----------------------------------------------------------------------------------------------
_MAL_BIRADS = (("4B", "4C", "5"), (0.3, 0.3, 0.4))
_BEN_BIRADS = (("2", "3", "4A"), (0.5, 0.35, 0.15))
_GLAND_FRACTION = (0.07, 0.22, 0.45, 0.70)


class _Geom:
    """Breast outline / muscle of one view, in mm (chest wall at u = 0)."""

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
        x, y = les.center_mm
        if self.view == "CC":
            return float(x), float(nipple_v_cc + y)
        return float(x + (self.D - depth_cc)), float(self.vn + les.mlo_offset_mm)

    def fits(self, u: float, v: float, radius: float) -> bool:
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


def _sample_lesion(rng, geoms, breast: Breast, kind: str, malignant: bool) -> Lesion | None:
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
        geoms = (_Geom(br, "CC"), _Geom(br, "MLO"))
        wanted: list[tuple[str, bool]] = []
        if side == malignant_side:
            wanted.append(("mass" if rng.random() < 0.65 else "calcification", True))
            if rng.random() < 0.2:
                wanted.append(("mass" if rng.random() < 0.6 else "calcification", False))
        else:
            n_benign = int(rng.choice([0, 1, 2], p=[0.6, 0.3, 0.1]))
            wanted += [("mass" if rng.random() < 0.6 else "calcification", False) for _ in range(n_benign)]
        for kind, mal in wanted:
            les = _sample_lesion(rng, geoms, br, kind, mal)
            if les is not None:
                br.lesions.append(les)
            elif mal:  # extremely unlikely; keep the label honest by retrying with a mass
                les = _sample_lesion(rng, geoms, br, "mass", True)
                if les is not None:
                    br.lesions.append(les)
    return breasts


# ----------------------------------------------------------------------------------------------
# Texture / canonical attenuation map
# ----------------------------------------------------------------------------------------------
_FREQ_CACHE: dict = {}


def _freq(shape, cs):
    key = (shape, round(cs, 9))
    if key not in _FREQ_CACHE:
        fy = _sfft.fftfreq(shape[0], d=cs).astype(np.float32)[:, None]
        fx = _sfft.fftfreq(shape[1], d=cs).astype(np.float32)[None, :]
        f = np.sqrt(fx ** 2 + fy ** 2)
        # power-law spectrum (beta ~ 3) with a low-frequency knee and a high-frequency rolloff
        spec_gland = (f ** 2 + (1 / 45.0) ** 2) ** (-0.75) * np.exp(-((f * 1.2) ** 2))
        spec_fine = (f ** 2 + (1 / 12.0) ** 2) ** (-0.6) * np.exp(-((f * 0.9) ** 2))
        f0 = 1 / 9.0
        spec_lig = np.exp(-(((f - f0) / (0.45 * f0)) ** 2)) * np.exp(-((f * 1.0) ** 2))
        _FREQ_CACHE.clear()
        _FREQ_CACHE[key] = (spec_gland.astype(np.complex64), spec_fine.astype(np.complex64),
                            spec_lig.astype(np.complex64))
    return _FREQ_CACHE[key]


def _std_norm(x):
    x = x - x.mean()
    return x / (x.std() + 1e-8)


def _polar_strands(rng, geom: _Geom, u, v, cs):
    """Duct-like strands converging on the nipple (noise elongated along rays from the nipple)."""
    r_max = 280.0
    dr = 2.0 * cs
    dth = 1.4 * cs / 80.0
    nr = int(r_max / dr) + 2
    nth = int(math.pi / dth) + 2
    noise = rng.standard_normal((nr, nth), dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (10.0 / dr, 2.2), mode="nearest")
    noise = _std_norm(noise)
    du = (u - geom.D).astype(np.float32)
    dv = (v - geom.vn).astype(np.float32)
    r = np.sqrt(du * du + dv * dv) / np.float32(dr)
    th = (np.arctan2(dv, -du) + np.float32(math.pi / 2)) / np.float32(dth)
    out = ndimage.map_coordinates(noise, [r, th], order=1, mode="nearest", prefilter=False)
    return out * np.clip(r * np.float32(dr / 30.0), 0.15, 1)  # fade where rays converge


def _canon_spacing(scale: float) -> float:
    """Canonical canvas spacing (mm): depends on ``scale`` only, so all styles share the anatomy."""
    return max(_CANON_SPACING, 0.25 / float(scale))


def _canonical(breast: Breast, view: str, scale: float):
    """Attenuation map of one breast/view on the canonical canvas (style independent)."""
    cs = _canon_spacing(scale)
    Hc = int(math.ceil(_CANVAS_MM[0] / cs))
    Wc = int(math.ceil(_CANVAS_MM[1] / cs))
    Hf, Wf = _sfft.next_fast_len(Hc), _sfft.next_fast_len(Wc)
    geom = _Geom(breast, view)
    rng = np.random.default_rng([int(breast.texture_seed), 0 if view == "CC" else 1, 77])
    u = ((np.arange(Wc, dtype=np.float32) + 0.5) * cs)[None, :]
    v = (_CANVAS_V0 + (np.arange(Hc, dtype=np.float32) + 0.5) * cs)[:, None]

    thick, dist = geom.thickness_and_edge(u, v)
    inside = thick > 0

    spec_gland, spec_fine, spec_lig = _freq((Hf, Wf), cs)
    w1 = (rng.standard_normal((Hf, Wf), dtype=np.float32)
          + 1j * rng.standard_normal((Hf, Wf), dtype=np.float32)).astype(np.complex64)
    f1 = _sfft.ifft2(w1 * spec_gland, workers=1)[:Hc, :Wc]
    w2 = (rng.standard_normal((Hf, Wf), dtype=np.float32)
          + 1j * rng.standard_normal((Hf, Wf), dtype=np.float32)).astype(np.complex64)
    f2 = _sfft.ifft2(w2 * spec_lig, workers=1)[:Hc, :Wc]
    f3 = _sfft.ifft2(w1[::-1] * spec_fine, workers=1)[:Hc, :Wc]  # reuse noise, different filter
    blobs = _std_norm(f1.real)
    blobs2 = _std_norm(f1.imag)
    lig = _std_norm(f2.real)
    fine = _std_norm(f3.real)
    strands = _polar_strands(rng, geom, u, v, cs)

    # glandular prior: cone from the nipple toward the chest wall, densest in the central region
    s = np.clip((geom.D - u) / geom.D, 0, 1.3)
    half = np.where(v < geom.vn, geom.h_up, geom.h_dn).astype(np.float32)
    if view == "MLO":
        half = np.minimum(half, np.float32(0.75 * geom.h_dn))
    width = half * (0.22 + 0.55 * np.clip(s, 0, 1))
    prior = np.exp(-(((s - 0.42) / 0.38) ** 2)) * np.exp(-(((v - geom.vn) / width) ** 2))
    prior *= np.clip(dist / 10.0, 0, 1)  # subcutaneous fat layer
    field_ = 0.6 * blobs + 0.3 * blobs2 + 0.3 * strands + 2.2 * prior
    sample = field_[::3, ::3][inside[::3, ::3] & (thick[::3, ::3] > 0.6)]
    frac = float(breast.gland_fraction)
    if sample.size > 10:
        thr = float(np.quantile(sample, 1.0 - frac))
    else:
        thr = float(field_.mean())
    g = 1.0 / (1.0 + np.exp(-(field_ - thr) / 0.4))
    g = g * np.clip(0.86 + 0.14 * fine, 0.5, 1.2)
    liga = np.exp(-((lig / 0.3) ** 2)) * np.clip(dist / 6.0, 0, 1)  # Cooper ligament network

    A = thick * (0.7 + 1.1 * g + 0.035 * liga * (1 - g) + 0.03 * fine)
    # skin line (slightly denser thin band)
    A += np.where(inside, 0.22 * np.exp(-(((dist - 0.9) / 0.8) ** 2)), 0).astype(np.float32)

    # pectoral muscle / CC sliver
    mr = geom.muscle_rho(u, v)
    if np.isfinite(mr).any():
        scale_mm = geom.pec[0] if geom.pec is not None else geom.sliver[0]
        edge = 1.0 / (1.0 + np.exp(-np.clip((1 - mr) * scale_mm / 0.8, -30, 30)))
        grad_ = np.clip(1 - mr, 0, 1)
        amp = (0.5 + 0.4 * grad_) if geom.pec is not None else (0.3 + 0.3 * grad_)
        A += (edge * (amp + 0.05 * blobs) * np.clip(thick * 1.5, 0, 1)).astype(np.float32)
    return A.astype(np.float32), cs, geom


_CANON_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()


def _canonical_cached(breast: Breast, view: str, scale: float):
    key = (repr(breast), view, float(scale))
    hit = _CANON_CACHE.get(key)
    if hit is not None:
        _CANON_CACHE.move_to_end(key)
        return hit
    out = _canonical(breast, view, scale)
    _CANON_CACHE[key] = out
    while len(_CANON_CACHE) > 4:
        _CANON_CACHE.popitem(last=False)
    return out


# ----------------------------------------------------------------------------------------------
# Lesions (drawn on the detector grid)
# ----------------------------------------------------------------------------------------------
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


def _lesion_patch(les: Lesion, du, dv, eff: float, rot: float):
    """Attenuation added by a lesion on a patch; du/dv are mm offsets from the lesion centre."""
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


def _lesion_extent_mm(les: Lesion) -> float:
    if les.kind == "mass":
        return les.radius_mm * (2.6 if les.malignant else 1.05) + 1.0
    return les.radius_mm * 1.6 + 2.5


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------
def _noise_field(rng, shape, corr_px: float):
    n = rng.standard_normal(shape, dtype=np.float32)
    if corr_px <= 0.05:
        return n
    n = ndimage.gaussian_filter(n, corr_px, mode="reflect", truncate=3.0)
    # analytic std of Gaussian-filtered white noise: sum of squared 1-D weights, squared (2-D)
    rad = int(3.0 * corr_px + 0.5)
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / corr_px) ** 2)
    k /= k.sum()
    return n / np.float32(np.sum(k ** 2))


def _style_key(style: Style) -> int:
    return zlib.crc32(repr(dataclasses.astuple(style)).encode())


def render(breast: Breast, view: str, style: Style, *, scale: float = 1.0):
    """Render one image.

    Returns ``(pixels, lesions)``: ``pixels`` uint16 stored values exactly as they go into
    PixelData (MONOCHROME1 already inverted, range [0, 2**bits_stored - 1]); ``lesions`` one dict
    per visible lesion: ``{"box": (x_min, y_min, x_max, y_max), "lesion_class": ..., "birads": ...}``
    in stored-pixel coordinates (column x, row y, continuous; pixel i spans [i, i + 1)).
    """
    view = view.upper()
    A_c, cs, geom = _canonical_cached(breast, view, scale)
    rows, cols = style.matrix(scale)
    eff = style.pixel_spacing_mm / float(scale)
    # canvas index coordinate of detector pixel (r, c): r * eff / cs + offset
    off_r = (0.5 * eff - rows * eff / 2.0 - _CANVAS_V0) / cs - 0.5
    off_c = (0.5 * eff) / cs - 0.5
    A = ndimage.affine_transform(A_c, [eff / cs, eff / cs], offset=[off_r, off_c],
                                 output_shape=(rows, cols), order=1, mode="nearest", prefilter=False)

    boxes = []
    for les in breast.lesions:
        uc, vc = geom.lesion_center(les, breast.depth_mm, breast.cc_offset_mm)
        col_c = uc / eff - 0.5
        row_c = (vc + rows * eff / 2.0) / eff - 0.5
        ext = _lesion_extent_mm(les) / eff
        r0, r1 = max(int(math.floor(row_c - ext)), 0), min(int(math.ceil(row_c + ext)) + 1, rows)
        c0, c1 = max(int(math.floor(col_c - ext)), 0), min(int(math.ceil(col_c + ext)) + 1, cols)
        if r1 <= r0 or c1 <= c0:
            continue
        dv = ((np.arange(r0, r1, dtype=np.float32) - row_c) * eff)[:, None]
        du = ((np.arange(c0, c1, dtype=np.float32) - col_c) * eff)[None, :]
        du, dv = np.broadcast_arrays(du, dv)
        patch = _lesion_patch(les, du, dv, eff, geom.rot)
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

    # attenuation -> MONOCHROME2 signal -> style
    S = np.float32(_SIGNAL_BG) + np.float32(1 - _SIGNAL_BG) * (1 - np.exp(-np.float32(_ATT_K) * A))
    if style.gamma != 1.0:
        S = S ** np.float32(style.gamma)
    if style.contrast != 1.0 or style.brightness != 0.0:
        S = np.float32(style.pivot) + np.float32(style.contrast) * (S - np.float32(style.pivot))
        S += np.float32(style.brightness)
    if style.sharpen > 0:
        blur = ndimage.gaussian_filter(S, style.sharpen_sigma_px, truncate=3.0)
        S += np.float32(style.sharpen) * (S - blur)
    rng = np.random.default_rng([int(breast.texture_seed), 0 if view == "CC" else 1, _style_key(style),
                                 int(round(scale * 1e6))])
    if style.noise_sigma > 0:
        noise = _noise_field(rng, S.shape, style.noise_corr_px)
        # a little signal-dependent (quantum-like) component
        S += np.float32(style.noise_sigma) * noise * (np.float32(0.6) + np.float32(0.7) * np.sqrt(np.clip(S, 0, 1)))
    maxv = style.max_value
    q = np.clip(S, 0, 1) * np.float32(maxv) + np.float32(0.5)
    px = q.astype(np.uint16)
    if breast.laterality == "R":
        px = px[:, ::-1]
    if style.photometric == "MONOCHROME1":
        px = np.uint16(maxv) - px
    return np.ascontiguousarray(px), boxes


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------
_VIEW_CODES = {
    "CC": ("R-10242", "cranio-caudal"),
    "MLO": ("R-10226", "medio-lateral oblique"),
}
_PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"],
}


def _study_date(patient_index: int) -> str:
    d = _dt.date(2019, 1, 2) + _dt.timedelta(days=(int(patient_index) * 37) % 1400)
    return d.strftime("%Y%m%d")


def write_dicom(
    path,
    pixels: np.ndarray,
    *,
    style: Style,
    breast: Breast,
    view: str,
    patient_id: str,
    scale: float = 1.0,
    seed: int = 0,
    source: str = "PHANTOM",
) -> None:
    """Write ``pixels`` (stored values from :func:`render`) as an MG For-Presentation DICOM file.

    UIDs are deterministic in (seed, style, patient, laterality, view). The transfer syntax is
    ``style.transfer_syntax`` (compressed syntaxes via ``Dataset.compress``).
    """
    view = view.upper()
    lat = breast.laterality
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    rows, cols = pixels.shape
    spacing = float(style.pixel_spacing_mm) / float(scale)
    ent = ["mammodg-phantom", str(seed), style.name, patient_id]
    sop_uid = generate_uid(entropy_srcs=ent + [lat, view, "sop"])
    study_uid = generate_uid(entropy_srcs=ent + ["study"])
    series_uid = generate_uid(entropy_srcs=ent + ["series"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = MG_FOR_PRESENTATION_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    date = _study_date(breast.patient_index)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"ACC{patient_id}"
    ds.Modality = "MG"
    ds.Manufacturer = style.name
    ds.ManufacturerModelName = style.model_name or f"{style.name} Phantom"
    ds.InstitutionName = source
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM MAMMOGRAPHY"
    ds.SeriesDescription = f"{lat} {view}"
    ds.PatientName = f"PHANTOM^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = {"LCC": 1, "LMLO": 2, "RCC": 3, "RMLO": 4}.get(lat + view, 1)
    ds.PatientOrientation = _PATIENT_ORIENTATION[(lat, view)]
    ds.Laterality = lat
    ds.ImageLaterality = lat
    ds.ViewPosition = view
    code = Dataset()
    code.CodeValue, code.CodeMeaning = _VIEW_CODES[view]
    code.CodingSchemeDesignator = "SRT"
    code.ViewModifierCodeSequence = _DcmSequence([])
    ds.ViewCodeSequence = _DcmSequence([code])
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.ImagerPixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.DetectorType = "DIRECT"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = style.photometric
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = 16
    ds.BitsStored = int(style.bits_stored)
    ds.HighBit = int(style.bits_stored) - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "INVERSE" if style.photometric == "MONOCHROME1" else "IDENTITY"
    maxv = style.max_value
    if style.window:
        ds.WindowCenter = f"{(maxv + 1) / 2:.1f}"
        ds.WindowWidth = str(maxv + 1)
        ds.VOILUTFunction = "LINEAR"
    ts = pydicom.uid.UID(style.transfer_syntax)
    if ts == ExplicitVRLittleEndian:
        ds.PixelData = pixels.astype("<u2", copy=False).tobytes()
        ds["PixelData"].VR = "OW"
    else:
        kwargs = {}
        if ts == JPEG2000:
            kwargs["j2k_cr"] = [float(style.j2k_cr)]
        ds.compress(ts, pixels, generate_instance_uid=False, **kwargs)
        if ts == JPEG2000:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = [f"{float(style.j2k_cr):.2f}"]
            ds.LossyImageCompressionMethod = ["ISO_15444_1"]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# ----------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------
def _fmt_box(b: dict) -> str:
    x0, y0, x1, y1 = b["box"]
    return f"{x0:.1f} {y0:.1f} {x1:.1f} {y1:.1f} {b['lesion_class']} {b['birads']}"


def _max_birads(boxes: list[dict]) -> str:
    if not boxes:
        return "1"
    return max((b["birads"] for b in boxes), key=BIRADS_ORDER.index)


def make_phantoms(
    out_dir,
    *,
    patients: int,
    styles: "int | Sequence[Style]",
    seed: int,
    scale: float = 1.0,
    source: str = "PHANTOM",
    all_styles: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Write a phantom data set and return the path of ``out_dir/manifest.csv``.

    Patient i (id ``PH%05d``) is rendered in style ``i % K`` (or in every style when
    ``all_styles``); 4 images per rendering (L/R x CC/MLO) at
    ``out_dir/<style.name>/<patient_id>_<L|R>_<CC|MLO>.dcm``.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    style_list = default_styles(int(styles)) if isinstance(styles, (int, np.integer)) else list(styles)
    K = len(style_list)
    if K < 1:
        raise ValueError("need at least one style")
    jobs = []  # (patient_index, [style indices])
    for i in range(int(patients)):
        jobs.append((i, list(range(K)) if all_styles else [i % K]))
    total = sum(len(s) for _, s in jobs) * 4
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="phantoms", unit="img")
        except ImportError:  # pragma: no cover
            bar = None
    rows = []
    try:
        for i, style_idx in jobs:
            pid = f"PH{i:05d}"
            breasts = sample_patient(np.random.default_rng([int(seed), i]), i)
            for br in breasts:
                for view in ("CC", "MLO"):
                    for si in style_idx:  # styles innermost: the canonical anatomy is reused
                        st = style_list[si]
                        px, boxes = render(br, view, st, scale=scale)
                        rel = f"{st.name}/{pid}_{br.laterality}_{view}.dcm"
                        write_dicom(out / rel, px, style=st, breast=br, view=view, patient_id=pid,
                                    scale=scale, seed=seed, source=source)
                        label = int(any(b["lesion_class"].startswith("malignant") for b in boxes))
                        rows.append(((si, i, br.laterality, view), {
                            "image_path": rel,
                            "patient_id": pid,
                            "source": source,
                            "manufacturer": "",
                            "view": view,
                            "laterality": br.laterality,
                            "label": str(label),
                            "boxes": ";".join(_fmt_box(b) for b in boxes),
                            "birads": _max_birads(boxes),
                            "density": br.density_letter,
                            "split": "",
                        }))
                        if bar is not None:
                            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows.sort(key=lambda r: (r[0][0], r[0][1], r[0][2], 0 if r[0][3] == "CC" else 1))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        for _, r in rows:
            w.writerow(r)
    return manifest
