"""Breast mask, flip, resize, crop/pad and renormalisation (periodic-sampling paper, section 3.1.1).

Geometry, in order; lesion boxes ``(x_min, y_min, x_max, y_max)`` in continuous pixel coordinates
(pixel ``i`` spans ``[i, i + 1)``) follow every step:

1. resize to ``height`` rows keeping proportions (or, with ``target_spacing_mm``, to that spacing);
2. breast mask on the resized image: Otsu threshold, opening, largest connected component, holes
   filled: labels, markers and background are excluded;
3. flip so that the chest wall is on the LEFT edge for every image (the side the mask touches most);
4. crop/pad to ``(height, width)``: the chest wall stays at column 0, the nipple side is padded (or
   cropped, which is reported as ``truncated``); vertically the breast is centred (spacing mode only).

The stored image is 16 bits (:mod:`mammodg.preprocess.stored`): 0 outside the mask, inside the pixel
renormalised to [0, 1] over the mask. The model input (mask pixels in [0, 1], outside pixels a
constant giving every image the same mean) is computed from it when records are decoded
(``mammodg.records.schema.model_input``), so records stay integer and exact.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage

from mammodg.io.dicom import DicomRejected
from mammodg.preprocess.stored import STORED_MAX, from_stored, to_stored  # noqa: F401  (re-exported)


@dataclasses.dataclass
class Preprocessed:
    image: np.ndarray  # uint16 (height, width), encoding above
    boxes: np.ndarray  # float32 (n, 4) in ``image`` coordinates
    box_kept: np.ndarray  # bool (n_input,): False where a box fell outside the image
    flipped: bool  # mirrored horizontally (chest wall was on the right)
    scale: float  # output pixels per input pixel
    pixel_spacing_mm: float | None  # of the output image
    mask_fallback: bool  # thresholding failed; the mask is everything above the background level
    truncated: bool  # part of the breast was cropped away
    breast_fraction: float  # share of the output image inside the mask


def resize_stored(stored: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resize a stored image: values averaged over the mask only, the mask kept where it covers half a pixel."""
    if stored.shape == (rows, cols):
        return stored
    v, mask = from_stored(stored)
    m = resize(mask.astype(np.float32), rows, cols)
    vm = resize(v * mask, rows, cols)
    inside = m >= 0.5
    return to_stored(np.divide(vm, m, out=np.zeros_like(vm), where=inside), inside)


def resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Antialiased bilinear resize of a float image (PIL scales its kernel when downsampling)."""
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BILINEAR))


def otsu_threshold(image: np.ndarray, bins: int = 256) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(image, nbins=bins))


MASK_ROWS = 384  # the mask is computed at this height (morphology is costly) and upsampled
MAX_RESIZE_FACTOR = 16  # the resized image may hold at most this many times the output's pixels
MAX_MASK_FRACTION = 0.98  # a thresholded "breast" over more of the image than this is noise


def breast_mask(image: np.ndarray, *, reject_whole: bool = False) -> tuple[np.ndarray, bool]:
    """Mask of the breast: threshold + morphology + largest component + holes filled.

    Computed on a copy of at most ``MASK_ROWS`` rows and upsampled smoothly. Returns
    ``(mask, fallback)``; ``fallback`` is True when the result was implausible (under 3% or over 98% of
    the image) and the mask is instead every pixel above the darkest 5%; with ``reject_whole`` a mask
    over 98% raises DicomRejected instead.
    """
    rows, cols = image.shape
    f = min(1.0, MASK_ROWS / rows)
    small = resize(image, max(1, round(rows * f)), max(1, round(cols * f))) if f < 1 else image
    small = ndimage.uniform_filter(small, size=3)
    t_otsu = otsu_threshold(small)
    # Otsu splits dense tissue from the rest; the fatty periphery and the skin line lie between the
    # background level and it, so the threshold is moved a quarter of the way up from the background.
    background = float(np.median(small[small <= t_otsu]))
    mask = small > background + 0.25 * (t_otsu - background)
    radius = max(1, round(min(small.shape) / 100))
    line = np.ones(2 * radius + 1, bool)
    for axis in (0, 1):  # a square opening, done as two separable line openings
        mask = ndimage.binary_opening(mask, structure=line.reshape((-1, 1) if axis == 0 else (1, -1)))
    labels, n = ndimage.label(mask)
    if n > 0:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))
    if f < 1:
        mask = resize(mask.astype(np.float32), rows, cols) > 0.5
    frac = mask.mean()
    if reject_whole and frac > MAX_MASK_FRACTION:
        raise DicomRejected("mask_whole_image", f"the breast mask covers {frac:.1%} of the image: noise or a uniform field, not a mammogram")
    if 0.03 <= frac <= MAX_MASK_FRACTION:
        return mask, False
    fallback = image > np.quantile(image, 0.05)
    if fallback.mean() < 0.03:
        fallback = np.ones_like(mask)
    return fallback, True


def chest_wall_on_right(mask: np.ndarray) -> bool:
    """The chest wall is the image edge the breast mask touches most (columns 0..2% of the width)."""
    band = max(1, mask.shape[1] // 50)
    return bool(mask[:, -band:].sum() > mask[:, :band].sum())


def _crop_pad(arr: np.ndarray, rows: int, cols: int, row_offset: int) -> np.ndarray:
    """Place ``arr`` in a zero canvas of (rows, cols) with its top row at ``row_offset``, column 0 at 0."""
    out = np.zeros((rows, cols), arr.dtype)
    r0, r1 = max(0, -row_offset), min(arr.shape[0], rows - row_offset)
    c1 = min(arr.shape[1], cols)
    if r1 > r0:
        out[r0 + row_offset:r1 + row_offset, :c1] = arr[r0:r1, :c1]
    return out


def preprocess(
    pixels: np.ndarray,
    boxes: np.ndarray | None = None,
    *,
    height: int = 1152,
    width: int = 832,
    pixel_spacing_mm: float | None = None,
    target_spacing_mm: float | None = None,
    **_unused,
) -> Preprocessed:
    """Standardise one image (dense tissue bright, any range); see the module docstring."""
    boxes = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
    rows0, cols0 = pixels.shape
    if target_spacing_mm:
        if not pixel_spacing_mm:
            raise DicomRejected("no_pixel_spacing", "preprocess.target_spacing_mm is set but the image has no PixelSpacing / ImagerPixelSpacing")
        scale = pixel_spacing_mm / target_spacing_mm
        rows = max(1, round(rows0 * scale))
        spacing_out = target_spacing_mm
    else:
        scale = height / rows0
        rows = height
        spacing_out = pixel_spacing_mm / scale if pixel_spacing_mm else None
    cols = max(1, round(cols0 * scale))
    if rows * cols > MAX_RESIZE_FACTOR * height * width:  # bound the allocation before making it
        raise DicomRejected("resize_too_large", f"resizing to {cols}x{rows} exceeds {MAX_RESIZE_FACTOR}x the {width}x{height} output "
                            f"(target_spacing_mm too small for this image's pixel spacing?)")
    img = resize(pixels, rows, cols)
    sx, sy = cols / cols0, rows / rows0
    b = boxes * np.array([sx, sy, sx, sy], np.float32)

    mask, fallback = breast_mask(img, reject_whole=True)
    flipped = chest_wall_on_right(mask)
    if flipped:
        img, mask = img[:, ::-1], mask[:, ::-1]
        b = np.stack([cols - b[:, 2], b[:, 1], cols - b[:, 0], b[:, 3]], axis=1)

    row_offset = 0
    if rows != height:  # spacing mode: centre the breast vertically
        ys = np.nonzero(mask.any(axis=1))[0]
        centre = (ys[0] + ys[-1] + 1) / 2 if ys.size else rows / 2
        row_offset = int(round(height / 2 - centre))
    inside = mask.copy()
    mask = _crop_pad(mask, height, width, row_offset)
    truncated = bool(inside.sum() > mask.sum())
    img = _crop_pad(np.ascontiguousarray(img), height, width, row_offset)
    b = b + np.array([0, row_offset, 0, row_offset], np.float32)

    values = img[mask]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    v = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    stored = to_stored(v, mask)

    clipped = np.clip(b, 0, [width, height, width, height]).astype(np.float32)
    kept = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
    return Preprocessed(
        image=stored,
        boxes=clipped[kept],
        box_kept=kept,
        flipped=flipped,
        scale=float(scale),
        pixel_spacing_mm=spacing_out,
        mask_fallback=fallback,
        truncated=truncated,
        breast_fraction=float(mask.mean()),
    )
