"""Nipple and chest wall of a preprocessed mammogram (MSVCL v2, section III-C: the geometry of mass matching).

Input: a preprocessed image (:mod:`mammodg.preprocess.breast`: chest wall on the LEFT edge, stored
uint16 or float, dense tissue bright) and its breast mask (``stored > 0`` by default). Coordinates are
continuous pixels ``(x, y)`` (pixel ``i`` spans ``[i, i + 1)``), like the lesion boxes.

- **Chest wall.** CC: the left image edge (the line ``x = 0``). MLO: the pectoral line, the chord of the
  bright muscle in the top-left corner, from its top intercept ``(a, 0)`` to its chest-wall intercept
  ``(0, b)``. It is found by search: over a grid of ``(a, b)`` (then a finer grid around the best), the
  line that maximises the mean brightness in a band on the corner side minus that in a band on the
  breast side (both inside the mask, below the top ``TOP_ROWS_SKIPPED`` of rows, where film borders
  and collimator edges are bright). A line whose contrast stays under ``MIN_PECTORAL_CONTRAST`` is
  not a muscle: the chest wall falls back to the left edge (``status`` says so).
- **Nipple.** The breast-contour point farthest from the left edge (the breast apex, as the phantoms
  define it): the rightmost mask column, at the median of the rows reaching it. On 80 phantom MLOs
  (256 rows) this was 0.4 mm from the truth in median; the contour point farthest from the pectoral
  line was 2.8 mm (median) and 35 mm (90th percentile) away, so it is not used.
- **Fallbacks.** An empty or implausible mask (fewer than ``MIN_MASK_PIXELS`` pixels, or less than
  0.5% of the image), a mask of another shape, or a non-numeric, non-finite or non-2-D image never
  raises: the nipple is the image centre, the chest wall the left edge, and ``status`` names the reason.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

MIN_MASK_PIXELS = 16
MIN_PECTORAL_CONTRAST = 0.03  # in renormalised [0, 1] units
TOP_ROWS_SKIPPED = 0.01  # film borders and collimator edges along the top are bright but not muscle


@dataclasses.dataclass
class Landmarks:
    """Nipple ``(x, y)`` and chest-wall line (two points) of one preprocessed image."""

    nipple: tuple[float, float]
    chest_wall: tuple[tuple[float, float], tuple[float, float]]
    status: str = "ok"  # "ok" | "pectoral_not_found" | "empty_mask" | "bad_mask" | "bad_image"
    pectoral_contrast: float = 0.0  # MLO: the band contrast of the chosen line

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --- geometry ------------------------------------------------------------------------------------

def box_centres(boxes) -> np.ndarray:
    """(n, 2) centres of (n, 4) boxes ``(x_min, y_min, x_max, y_max)``."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)


def distance_to_point(points, point) -> np.ndarray:
    """Euclidean distance of (n, 2) points (or one) to ``point``."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    return np.hypot(p[:, 0] - point[0], p[:, 1] - point[1])


def distance_to_line(points, line) -> np.ndarray:
    """Distance of (n, 2) points (or one) to the infinite line through ``line = (p0, p1)``."""
    p = np.asarray(points, np.float64).reshape(-1, 2)
    (x0, y0), (x1, y1) = line
    dx, dy = x1 - x0, y1 - y0
    norm = np.hypot(dx, dy)
    if norm == 0:
        return distance_to_point(p, (x0, y0))
    return np.abs(dx * (p[:, 1] - y0) - dy * (p[:, 0] - x0)) / norm


def line_angle_deg(line) -> float:
    """Angle of a line in degrees in [0, 180), measured from the +x axis with y downward."""
    (x0, y0), (x1, y1) = line
    return float(np.degrees(np.arctan2(y1 - y0, x1 - x0)) % 180.0)


# --- estimation ----------------------------------------------------------------------------------

def _as_unit(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Image values renormalised to [0, 1] inside the mask (0 outside)."""
    img = image.astype(np.float64)
    v = img[mask]
    lo, hi = float(v.min()), float(v.max())
    return np.where(mask, (img - lo) / (hi - lo) if hi > lo else 0.0, 0.0)


def _rightmost(mask: np.ndarray) -> np.ndarray:
    """Per row, the right edge (continuous x) of the last mask pixel; 0 for empty rows."""
    cols = mask.shape[1]
    any_row = mask.any(axis=1)
    last = cols - np.argmax(mask[:, ::-1], axis=1)
    return np.where(any_row, last, 0).astype(np.float64)


def _nipple(mask: np.ndarray) -> tuple[float, float]:
    right = _rightmost(mask)
    rows = np.nonzero(right == right.max())[0]
    return float(right.max()), float(np.median(rows) + 0.5)


def _band_contrast(img, mask, a, b, width, n=48):
    """Mean of ``img`` in a band of ``width`` on the corner side of the line (a, 0)-(0, b) minus the
    mean on the other side (mask pixels below the top ``TOP_ROWS_SKIPPED`` of rows only); vectorised
    over arrays of candidates ``a``, ``b``."""
    a = np.asarray(a, np.float64)[:, None, None]
    b = np.asarray(b, np.float64)[:, None, None]
    t = np.linspace(0.05, 0.95, n)[None, :, None]
    skip_rows = TOP_ROWS_SKIPPED * mask.shape[0]
    norm = np.hypot(a, b)
    nx, ny = -b / norm, -a / norm  # unit normal toward the corner (0, 0)
    off = np.linspace(0.15, 1.0, 4)[None, None, :] * width
    xs, ys = a * (1 - t), b * t
    means = []
    for sign in (1, -1):
        px, py = xs + sign * off * nx, ys + sign * off * ny
        ix = np.clip(np.floor(px).astype(int), 0, mask.shape[1] - 1)
        iy = np.clip(np.floor(py).astype(int), 0, mask.shape[0] - 1)
        inside = mask[iy, ix] & (px >= 0) & (py >= skip_rows) & (px < mask.shape[1]) & (py < mask.shape[0])
        s = np.where(inside, img[iy, ix], 0).sum(axis=(1, 2))
        c = inside.sum(axis=(1, 2))
        means.append(np.where(c >= n, s / np.maximum(c, 1), np.nan))
    return means[0] - means[1]


def _pectoral(img, mask) -> tuple[float, float, float]:
    """(a, b, contrast) of the best pectoral chord, coarse grid then a finer one around its best."""
    rows, cols = mask.shape
    smooth = ndimage.gaussian_filter(img, max(0.5, rows / 200))
    top = _rightmost(mask)[: max(1, rows // 50)].max()  # breast width along the top edge
    width = max(2.0, rows / 40)
    a_min, a_max = 0.05 * top, 0.95 * top  # the search stays inside these bounds at every level
    b_min, b_max = 0.1 * rows, 1.0 * rows
    a_lo, a_hi, b_lo, b_hi = a_min, a_max, b_min, b_max
    best = (np.nan, np.nan, -np.inf)
    for _ in range(3):  # each level: a 24 x 24 grid, then zoom on the best
        a_grid = np.linspace(a_lo, a_hi, 24)
        b_grid = np.linspace(b_lo, b_hi, 24)
        aa, bb = (g.ravel() for g in np.meshgrid(a_grid, b_grid))
        score = _band_contrast(smooth, mask, aa, bb, width)
        if not np.isfinite(score).any():
            break
        i = int(np.nanargmax(score))
        best = (float(aa[i]), float(bb[i]), float(score[i]))
        da, db = 2 * (a_hi - a_lo) / 23, 2 * (b_hi - b_lo) / 23
        a_lo, a_hi = max(a_min, best[0] - da), min(a_max, best[0] + da)
        b_lo, b_hi = max(b_min, best[1] - db), min(b_max, best[1] + db)
    return best


def estimate_landmarks(image, view: str, mask=None) -> Landmarks:
    """Nipple and chest wall of one preprocessed image (see the module docstring); never raises on
    bad pixels or masks: ``status`` reports the fallback."""
    image = np.asarray(image)
    rows, cols = image.shape[:2] if image.ndim >= 2 else (1, 1)
    edge = ((0.0, 0.0), (0.0, float(rows)))
    centre = (cols / 2.0, rows / 2.0)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim != 2 or image.size == 0 or not np.issubdtype(image.dtype, np.number) or not np.all(np.isfinite(image)):
        return Landmarks(centre, edge, "bad_image")
    mask = image > 0 if mask is None else np.asarray(mask)
    if mask.shape != image.shape:
        return Landmarks(centre, edge, "bad_mask")
    mask = mask.astype(bool)
    if mask.sum() < max(MIN_MASK_PIXELS, 0.005 * mask.size):
        return Landmarks(centre, edge, "empty_mask")
    nipple = _nipple(mask)
    if str(view).upper() != "MLO":
        return Landmarks(nipple, edge)
    a, b, contrast = _pectoral(_as_unit(image, mask), mask)
    if not contrast >= MIN_PECTORAL_CONTRAST:
        return Landmarks(nipple, edge, "pectoral_not_found", float(contrast) if np.isfinite(contrast) else 0.0)
    return Landmarks(nipple, ((a, 0.0), (0.0, b)), "ok", contrast)
