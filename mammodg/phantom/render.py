"""Image formation: attenuation map -> detector grid -> signal -> stored pixels of one style.

A smooth attenuation map (thickness falloff at the skin line, fibroglandular texture, Cooper
ligaments, pectoral muscle) is computed on a canonical canvas whose spacing depends on ``scale``
only (``max(0.4, 0.25 / scale)`` mm), so every style of a scale shares the same anatomy; it is
resampled onto the style's detector grid, where the lesions are drawn. The attenuation ``A``
becomes a MONOCHROME2 signal ``S = bg + (1 - bg)(1 - exp(-k A))`` (dense = bright), which
:func:`~mammodg.phantom.styles.apply_style` turns into stored values. Left breasts have the chest
wall on the LEFT image edge, right breasts on the RIGHT edge, as mammograms are displayed.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
from scipy import fft as _sfft
from scipy import ndimage

from mammodg.phantom.anatomy import Breast, Geometry
from mammodg.phantom.lesions import draw_lesions
from mammodg.phantom.styles import Style, apply_style, style_key

_CANVAS_V0 = -130.0  # v of the canvas top edge (mm)
_CANVAS_MM = (260.0, 210.0)  # (v span, u span)
_CANON_SPACING = 0.4  # mm at scale 1 (see _canon_spacing)
_ATT_K = 0.62  # attenuation -> signal
_SIGNAL_BG = 0.035  # MONOCHROME2 signal of the empty detector

_FREQ_CACHE: dict = {}


def _freq(shape, cs):
    """Texture spectra (gland, fine, ligament) on an FFT grid of spacing ``cs``; the last grid is cached."""
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


def _polar_strands(rng, geom: Geometry, u, v, cs):
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
    geom = Geometry(breast, view)
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
    """:func:`_canonical` with the last four maps kept, so the styles of one image reuse the anatomy."""
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

    boxes = draw_lesions(A, breast, geom, eff)

    # attenuation -> MONOCHROME2 signal -> style
    S = np.float32(_SIGNAL_BG) + np.float32(1 - _SIGNAL_BG) * (1 - np.exp(-np.float32(_ATT_K) * A))
    rng = np.random.default_rng([int(breast.texture_seed), 0 if view == "CC" else 1, style_key(style),
                                 int(round(scale * 1e6))])
    px = apply_style(S, style, rng)
    if breast.laterality == "R":
        px = px[:, ::-1]
    return np.ascontiguousarray(px), boxes
