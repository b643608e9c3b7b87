"""Landmarks (mammodg.preprocess.landmarks) against the phantoms' recorded truth, fallbacks, geometry.

Stated tolerances (preprocessed at 192 rows, about 1.25 mm pixels for the 240 mm phantom field):
- nipple: within 3 mm of the truth on every image (CC and MLO, left and right);
- MLO pectoral line: angle within 10 degrees and offset (distance from the middle of the true chord
  to the estimated line) within 10 mm on at least 80% of images, with medians under 3 degrees and
  5 mm. On 80 phantom MLOs at 256 rows the estimator measured median 0.5 deg / 2.1 mm (90th
  percentile 2.6 deg / 6.1 mm), with 7.5% of images over 10 deg (it then follows a dense-tissue
  border instead of the muscle); nipple median 0.4 mm, max 1.05 mm (CC and MLO).
"""
import csv
import json

import numpy as np
import pytest

from mammodg.preprocess import landmarks as L

HEIGHT = 192


def _truth_and_estimate(out, row, marks):
    """Preprocess one phantom with its true landmarks carried as tiny boxes through the same call
    (the box transform of mammodg.preprocess.breast), then estimate the landmarks."""
    from mammodg.io.dicom import read_dicom
    from mammodg.preprocess.breast import preprocess

    im = read_dicom(out / row["image_path"])
    m = marks[row["image_path"]]
    (x0, y0), (x1, y1) = m["chest_wall"]
    pts = [m["nipple"]] + [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t) for t in (0.25, 0.75)]  # chord inside
    rows0, cols0 = im.pixels.shape
    e = 2.0 * rows0 / HEIGHT  # 2 output pixels: the box survives the clip
    width = int(np.ceil(HEIGHT * cols0 / rows0)) + 2  # no crop on the nipple side
    p = preprocess(im.pixels, np.array([[x - e, y - e, x + e, y + e] for x, y in pts]), height=HEIGHT, width=width,
                   pixel_spacing_mm=im.pixel_spacing_mm)
    assert p.box_kept.all()
    c = L.box_centres(p.boxes)
    return p, c[0], (tuple(c[1]), tuple(c[2])), L.estimate_landmarks(p.image, row["view"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from mammodg.phantom import make_phantoms

    out = tmp_path_factory.mktemp("landmark_phantoms")
    manifest = make_phantoms(out, patients=8, styles=4, seed=7, scale=0.25, progress=False)
    rows = list(csv.DictReader(open(manifest, newline="")))
    marks = json.loads((out / "landmarks.json").read_text())
    return [(r, *_truth_and_estimate(out, r, marks)) for r in rows]


def test_nipple_within_3mm_on_every_view_and_side(results):
    seen = set()
    for r, p, nipple, _, est in results:
        assert est.ok, (r["image_path"], est.status)
        assert p.flipped == (r["laterality"] == "R")  # the chest wall lands on the left edge
        err = np.hypot(*(np.array(est.nipple) - nipple)) * p.pixel_spacing_mm
        assert err < 3.0, (r["image_path"], err)
        seen.add((r["view"], r["laterality"]))
    assert seen == {("CC", "L"), ("CC", "R"), ("MLO", "L"), ("MLO", "R")}


def test_cc_chest_wall_is_the_left_edge(results):
    for r, p, _, _, est in results:
        if r["view"] == "CC":
            (x0, _), (x1, _) = est.chest_wall
            assert x0 == x1 == 0.0


def test_pectoral_line_angle_and_offset(results):
    ang, off = [], []
    for r, p, _, true_line, est in results:
        if r["view"] != "MLO":
            continue
        d = L.line_angle_deg(est.chest_wall) - L.line_angle_deg(true_line)
        ang.append(abs((d + 90) % 180 - 90))
        mid = np.mean(np.array(true_line), axis=0)
        off.append(float(L.distance_to_line(mid, est.chest_wall)[0]) * p.pixel_spacing_mm)
    ang, off = np.array(ang), np.array(off)
    assert len(ang) == 16
    assert np.median(ang) < 3.0 and (ang < 10).mean() >= 0.8, ang.round(1)
    assert np.median(off) < 5.0 and (off < 10).mean() >= 0.8, off.round(1)


@pytest.mark.parametrize("image,view,mask,status", [
    (np.zeros((64, 48), np.uint16), "CC", None, "empty_mask"),
    (np.zeros((64, 48), np.uint16), "MLO", None, "empty_mask"),
    (np.full((64, 48), np.nan), "MLO", None, "bad_image"),
    (np.zeros(10), "CC", None, "bad_image"),
    (np.zeros((0, 5)), "MLO", None, "bad_image"),
    (np.ones((64, 48)), "CC", np.zeros((64, 48), bool), "empty_mask"),
    (np.ones((64, 48)), "CC", np.ones((32, 48), bool), "bad_mask"),
    (np.array([["a", "b"], ["c", "d"]]), "CC", None, "bad_image"),
    (np.ones((64, 48)), "MLO", None, "pectoral_not_found"),  # uniform: no muscle
])
def test_fallbacks_never_raise(image, view, mask, status):
    est = L.estimate_landmarks(image, view, mask)
    assert est.status == status and not est.ok
    (x0, _), (x1, _) = est.chest_wall
    assert x0 == x1 == 0.0  # the left edge
    assert np.all(np.isfinite(est.nipple))


def test_broken_mask_gives_an_answer():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65535, (64, 48)).astype(np.uint16)
    est = L.estimate_landmarks(img, "MLO", rng.random((64, 48)) > 0.5)  # speckle
    assert est.status in ("ok", "pectoral_not_found") and np.all(np.isfinite(est.nipple))
    est = L.estimate_landmarks(img[..., None], "CC")  # (h, w, 1) accepted
    assert est.ok


def test_geometry_by_hand():
    assert L.distance_to_line([(3, 4)], ((0, 0), (0, 10))).tolist() == [3.0]
    assert L.distance_to_line([(2, 0), (0, 0)], ((0, 2), (2, 0))) == pytest.approx([0.0, np.sqrt(2)])
    assert L.distance_to_point([(3, 4), (0, 0)], (0, 0)).tolist() == [5.0, 0.0]
    assert L.box_centres([[0, 2, 4, 10]]).tolist() == [[2.0, 6.0]]
    assert L.line_angle_deg(((0, 0), (0, 5))) == 90.0 and L.line_angle_deg(((4, 0), (0, 4))) == 135.0
