"""Preprocessing: mask, flip, resize, crop/pad, renormalisation; boxes follow every geometric step."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mammodg.io.dicom import read_dicom
from mammodg.preprocess.breast import breast_mask, preprocess


def synthetic(rows=600, cols=400, chest_right=True, lesion=(150, 250, 190, 290), seed=0):
    """A half-ellipse breast on a noisy dark background with a label block and a bright lesion.

    Returns (image, truth breast mask, lesion box in (x_min, y_min, x_max, y_max)).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    cx = cols if chest_right else 0
    breast = ((xx - cx) / (0.8 * cols)) ** 2 + ((yy - rows / 2) / (0.42 * rows)) ** 2 < 1
    img = 0.03 + 0.01 * rng.standard_normal((rows, cols))
    tissue = 0.45 + 0.1 * ndimage.gaussian_filter(rng.standard_normal((rows, cols)), 4) * 10
    img[breast] = np.clip(tissue[breast], 0.25, 0.75)
    x0, y0, x1, y1 = lesion
    img[y0:y1, x0:x1] = 0.95
    label = (slice(10, 40), slice(5, 60)) if chest_right else (slice(10, 40), slice(cols - 60, cols - 5))
    img[label] = 1.0  # a film label / marker away from the breast
    return img.astype(np.float32), breast, np.array([lesion], np.float32)


def _bright_bbox(stored, thresh=60000):
    ys, xs = np.nonzero(stored >= thresh)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_mask_matches_truth_and_excludes_label():
    img, truth, _ = synthetic()
    mask, fallback = breast_mask(img)
    assert not fallback
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95
    assert not mask[10:40, 5:60].any()  # the label block is not breast


@pytest.mark.parametrize("chest_right", [True, False])
def test_boxes_follow_resize_flip_pad(chest_right):
    lesion = (250, 250, 290, 290) if chest_right else (110, 250, 150, 290)
    img, _, box = synthetic(chest_right=chest_right, lesion=lesion)
    res = preprocess(img, box, height=300, width=256)
    assert res.image.shape == (300, 256) and res.image.dtype == np.uint16
    assert res.flipped == chest_right
    # chest wall on the left: the mask touches column 0, not the last column
    assert (res.image[:, 0] > 0).sum() > 100 and (res.image[:, -1] > 0).sum() == 0
    np.testing.assert_allclose(res.boxes[0], _bright_bbox(res.image), atol=1.0)
    np.testing.assert_allclose(res.scale, 0.5)


def test_spacing_mode_and_vertical_centring():
    img, _, box = synthetic(rows=400, cols=300, lesion=(200, 150, 230, 180))
    res = preprocess(img, box, height=512, width=256, pixel_spacing_mm=0.2, target_spacing_mm=0.1)
    assert res.image.shape == (512, 256) and res.scale == pytest.approx(2.0)
    assert res.pixel_spacing_mm == 0.1
    ys = np.nonzero((res.image > 0).any(axis=1))[0]
    assert abs((ys[0] + ys[-1]) / 2 - 256) < 4  # breast centred vertically
    np.testing.assert_allclose(res.boxes[0], _bright_bbox(res.image), atol=1.0)
    with pytest.raises(ValueError, match="PixelSpacing"):
        preprocess(img, box, target_spacing_mm=0.1)


def test_box_outside_after_crop_is_dropped():
    img, _, _ = synthetic(rows=200, cols=400, chest_right=False, lesion=(10, 90, 20, 100))
    far = np.array([[390, 90, 399, 100]], np.float32)
    res = preprocess(img, far, height=200, width=200)
    assert res.box_kept.tolist() == [False] and res.boxes.shape == (0, 4)


def test_renormalisation_inside_mask():
    img, _, _ = synthetic()
    res = preprocess(img, None, height=300, width=256)
    inside = res.image[res.image > 0]
    assert inside.min() == 1 and inside.max() == 65535  # [0, 1] over the mask


def test_real_mammograms(real_cases):
    for folder, key, path in real_cases:
        d = read_dicom(path)
        res = preprocess(d.pixels, None, pixel_spacing_mm=d.pixel_spacing_mm)
        assert res.image.shape == (1152, 832)
        assert res.flipped == (key[0] == "r"), (folder, key)
        assert not res.mask_fallback and not res.truncated
        mask = res.image > 0
        assert 0.1 < mask.mean() < 0.6
        assert ndimage.label(mask)[1] == 1  # one breast, no stray labels or markers
        assert mask[:, 0].sum() > 300  # chest wall on the left
        assert not mask[:, -60:].any()  # background on the nipple side is excluded
        # the excluded region of the resized image holds no breast-like tissue: its median is dark
        rows, cols = d.pixels.shape
        small = np.asarray(d.pixels[:: rows // 288, :: cols // 208], np.float32)
        assert np.median(small) < np.percentile(small, 90) / 2
