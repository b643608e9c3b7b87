"""Detection metrics (mammodg.metrics.detection): AP / mAP against pycocotools called directly and against
hand computations, no-finding false positives, FROC on a hand-made case, the per-domain Table II rows."""
import contextlib
import io
import math

import numpy as np
import pytest

from mammodg.metrics import detection as det
from mammodg.metrics import detection_report as detrep


def _img(gt=(), dets=(), scores=(), domain="A", gt_classes=None, classes=None):
    out = {"gt_boxes": np.array(gt, float).reshape(-1, 4), "boxes": np.array(dets, float).reshape(-1, 4),
           "scores": np.array(scores, float), "domain": domain}
    if gt_classes is not None:
        out["gt_classes"], out["classes"] = gt_classes, classes
    return out


# the hand case: 2 images, 3 lesions, 4 detections (one at IoU 90/110 = 0.818)
HAND = [
    _img(gt=[[0, 0, 10, 10], [20, 20, 30, 30]], dets=[[0, 0, 10, 10], [21, 20, 31, 30]], scores=[0.9, 0.7]),
    _img(gt=[[0, 0, 10, 10]], dets=[[50, 50, 60, 60], [0, 0, 10, 10]], scores=[0.8, 0.6]),
]
NO_FINDING = _img(dets=[[5, 5, 15, 15]], scores=[0.95])


def test_ap_of_the_hand_case_matches_the_101_point_computation():
    # ranked: TP, FP, TP(IoU .818), TP. At IoU <= 0.80: precision envelope 1 up to recall 1/3 (34 of the
    # 101 recall points 0, .01, ..., .33) then 3/4 (67 points) -> AP = (34 + 67 * .75) / 101.
    # At IoU 0.85, 0.90, 0.95 the third is a FP: 1 for 34 points, 1/2 for 33 (.34-.66), 0 beyond -> 50.5/101.
    r = det.average_precision(HAND)
    ap_low, ap_high = 84.25 / 101, 50.5 / 101
    assert r["ap50"] == pytest.approx(ap_low, abs=1e-12)
    for t, ap in r["ap_per_iou"].items():
        assert ap == pytest.approx(ap_low if t <= 0.8 + 1e-9 else ap_high, abs=1e-12), t
    assert r["map"] == pytest.approx((7 * ap_low + 3 * ap_high) / 10, abs=1e-12)
    assert (r["n_images"], r["n_lesions"], r["n_detections"]) == (2, 3, 4)


def test_false_positives_on_no_finding_images_lower_the_ap():
    # a FP at score .95 on an image without lesions ranks first: precisions 0, 1/2, 1/3, 1/2, 3/5 at recalls
    # 0, 1/3, 1/3, 2/3, 1 -> envelope 3/5 everywhere -> AP50 = 0.6 exactly
    r = det.average_precision(HAND + [NO_FINDING], iou_thresholds=[0.5])
    assert r["ap50"] == pytest.approx(0.6, abs=1e-12) and r["map"] == r["ap50"]
    assert r["ap50"] < det.average_precision(HAND)["ap50"]
    # a no-finding image without detections changes nothing
    assert det.average_precision(HAND + [_img()])["ap_per_iou"] == det.average_precision(HAND)["ap_per_iou"]


def _random_case(rng, n_images=8):
    images = []
    for i in range(n_images):
        n = 0 if i % 3 == 0 else int(rng.integers(1, 4))  # every third image has no finding
        xy = rng.uniform(0, 200, (n, 2))
        gt = np.c_[xy, xy + rng.uniform(8, 60, (n, 2))]
        gcls = [["mass", "calcification"][int(c)] for c in rng.integers(0, 2, n)]
        jitter = gt + rng.normal(0, 4, gt.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        m = int(rng.integers(0, 4))
        fxy = rng.uniform(0, 200, (m, 2))
        fps = np.c_[fxy, fxy + rng.uniform(8, 60, (m, 2))]
        boxes = np.r_[jitter, fps]
        classes = gcls + [["mass", "calcification"][int(c)] for c in rng.integers(0, 2, m)]
        images.append(_img(gt, boxes, rng.random(len(boxes)), gt_classes=[c.encode() for c in gcls], classes=classes))
    return images


def _pycocotools_directly(images, class_agnostic=False):
    """The usual pycocotools route, written independently: json-like dicts, loadRes, summarize()."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    name = lambda c: "lesion" if class_agnostic else (c.decode() if isinstance(c, bytes) else c)  # noqa: E731
    cats = ["lesion"] if class_agnostic else sorted({name(c) for im in images for c in im["gt_classes"]})
    cid = {c: 10 + k for k, c in enumerate(cats)}
    gt = {"images": [{"id": 100 + i} for i in range(len(images))], "categories": [{"id": v} for v in cid.values()],
          "annotations": []}
    res = []
    for i, im in enumerate(images):
        for b, c in zip(im["gt_boxes"], im.get("gt_classes") or ["lesion"] * len(im["gt_boxes"])):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": 100 + i, "iscrowd": 0,
                                      "category_id": cid[name(c)], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                                      "area": (b[2] - b[0]) * (b[3] - b[1])})
        for b, s, c in zip(im["boxes"], im["scores"], im.get("classes") or ["lesion"] * len(im["boxes"])):
            if name(c) in cid:
                res.append({"image_id": 100 + i, "category_id": cid[name(c)], "score": s,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[0], ev.stats[1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_map_agrees_with_pycocotools_called_directly(seed, class_agnostic):
    images = _random_case(np.random.default_rng(seed))
    want_map, want_ap50 = _pycocotools_directly(images, class_agnostic)
    r = det.average_precision(images, class_agnostic=class_agnostic)
    assert 0 < r["ap50"] < 1
    assert r["map"] == pytest.approx(want_map, abs=1e-12)
    assert r["ap50"] == pytest.approx(want_ap50, abs=1e-12)


def test_ap_edge_cases_and_bad_input():
    assert math.isnan(det.average_precision([NO_FINDING])["ap50"])  # no lesion: undefined, not 0 or 1
    assert det.average_precision([_img(gt=[[0, 0, 4, 4]])])["ap50"] == 0.0  # lesion, no detection
    perfect = det.average_precision([_img(gt=[[0, 0, 4, 4]], dets=[[0, 0, 4, 4]], scores=[0.3])])
    assert perfect["ap50"] == pytest.approx(1.0, abs=1e-12) and perfect["map"] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match=r"image 1 \('x'\).*scores"):
        det.average_precision([HAND[0], {"image_id": "x", "gt_boxes": [], "boxes": [[0, 0, 1, 1]], "scores": []}])
    with pytest.raises(ValueError, match="image 0 gt_boxes.*x_max >= x_min"):
        det.average_precision([_img(gt=[[5, 0, 1, 1]])])


def test_froc_sensitivities_on_a_hand_made_case():
    # 2 images, 3 lesions. Ranked detections and running (FPs per image, sensitivity):
    #  .9 FP (0.5, 0) | .8 TP g1 (0.5, 1/3) | .7 FP (1.0, 1/3) | .6 FP: centre in g3, IoU .25 < .5 (1.5, 1/3)
    #  .5 TP g2 (1.5, 2/3) | .4 FP (2.0, 2/3) | .3 second hit on g1: FP (2.5, 2/3) | .2 TP g3 (2.5, 1)
    images = [
        _img(gt=[[0, 0, 10, 10], [20, 20, 30, 30]],
             dets=[[100, 100, 110, 110], [0, 0, 10, 10], [20, 21, 30, 31], [60, 60, 70, 70], [1, 0, 11, 10]],
             scores=[0.9, 0.8, 0.5, 0.4, 0.3]),
        _img(gt=[[40, 40, 60, 60]], dets=[[0, 50, 10, 60], [45, 45, 55, 55], [40, 41, 60, 61]],
             scores=[0.7, 0.6, 0.2]),
    ]
    r = det.froc(images)
    np.testing.assert_allclose(r["sensitivity"], [1 / 3, 1 / 3, 2 / 3, 1.0])
    assert r["mean_sensitivity"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3 + 1) / 4)
    np.testing.assert_allclose(r["curve"]["fps_per_image"], [0, .5, .5, 1, 1.5, 1.5, 2, 2.5, 2.5])
    np.testing.assert_allclose(r["curve"]["sensitivity"], [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 1])
    assert r["max_fps_per_image"] == 2.5 and (r["n_images"], r["n_lesions"]) == (2, 3)
    # plus a no-finding image with two FPs ranked first: 3 images, every point moves right
    r3 = det.froc(images + [_img(dets=[[0, 0, 5, 5], [9, 9, 19, 19]], scores=[0.99, 0.98])])
    # running FPs/image now (1, 2, 3, 3, 4, 5, 5, 6, 7, 7) / 3 -> at 1 FP/image: 1/3 (reached at 3/3)
    np.testing.assert_allclose(r3["sensitivity"], [0, 1 / 3, 2 / 3, 1.0])


def test_froc_ties_are_one_threshold_and_classes_can_be_required():
    images = [_img(gt=[[0, 0, 10, 10]], dets=[[50, 50, 60, 60], [0, 0, 10, 10]], scores=[0.5, 0.5])]
    r = det.froc(images, fps_per_image=[0.5, 1])
    np.testing.assert_allclose(r["curve"]["fps_per_image"], [0, 1])  # both detections enter together
    np.testing.assert_allclose(r["sensitivity"], [0, 1])
    wrong_class = [_img(gt=[[0, 0, 10, 10]], dets=[[0, 0, 10, 10]], scores=[0.5], gt_classes=["mass"],
                        classes=["calcification"])]
    assert det.froc(wrong_class)["sensitivity"][0] == 1.0
    assert det.froc(wrong_class, class_agnostic=False)["sensitivity"][-1] == 0.0


def test_domain_table_values_and_markdown_on_a_hand_made_case():
    hand_ap50 = 84.25 / 101
    perfect = _img(gt=[[0, 0, 10, 10]], dets=[[0, 0, 10, 10]], scores=[0.9])
    method_1 = ([dict(im, domain="S1|A") for im in HAND] + [dict(perfect, domain="S1|B")]
                + [dict(im, domain="S2|D") for im in HAND + [NO_FINDING]])
    method_2 = [dict(perfect, domain=d) for d in ("S1|A", "S1|B", "S2|D")]
    rows = det.domain_table({"random": method_1, "msvcl": method_2}, seen=["S1|A", "S1|B", "S1|C"],
                            unseen=["S2|D"])
    r1, r2 = rows
    assert r1["method"] == "random" and list(r1["seen"]) == ["S1|A", "S1|B", "S1|C"]
    assert r1["seen"]["S1|A"] == pytest.approx(hand_ap50) and r1["seen"]["S1|B"] == pytest.approx(1.0)
    assert math.isnan(r1["seen"]["S1|C"])  # no images of that domain: n/a, left out of the average
    assert r1["seen_avg"] == pytest.approx((hand_ap50 + 1.0) / 2)
    assert r1["unseen"]["S2|D"] == pytest.approx(0.6) and r1["unseen_avg"] == pytest.approx(0.6)
    assert r2["seen_avg"] == pytest.approx(1.0) and r2["unseen_avg"] == pytest.approx(1.0)
    md = detrep.domain_table_markdown(rows)
    lines = md.splitlines()
    assert lines[2] == "| Method | Seen: S1\\|A | Seen: S1\\|B | Seen: S1\\|C | Seen avg. | Unseen: S2\\|D | Unseen avg. |"
    assert lines[4] == "| random | 83.4 | 100.0 | n/a | 91.7 | 60.0 | 60.0 |"
    assert lines[5] == "| msvcl | 100.0 | 100.0 | n/a | 100.0 | 100.0 | 100.0 |"
    with pytest.raises(ValueError, match=r"\['S9'\] are neither seen nor unseen"):
        det.domain_table({"m": [dict(perfect, domain="S9")]}, seen=["S1|A"])
    mp = det.domain_table({"m": method_1}, seen=["S1|A"], unseen=["S1|B", "S2|D"], metric="map")[0]
    assert mp["seen"]["S1|A"] == pytest.approx(det.average_precision(HAND)["map"])
    assert det.per_domain(method_1)["S1|B"]["ap50"] == pytest.approx(1.0)


def test_froc_plot_and_overlays_write_pngs(tmp_path):
    from matplotlib.image import imread

    curves = {"all": det.froc(HAND + [NO_FINDING]), "A": det.froc(HAND)}
    p = detrep.plot_froc(curves, tmp_path / "froc.png")
    assert p.exists() and imread(p).shape[0] > 100
    image = np.zeros((64, 48), np.uint16)
    image[10:50, 0:30] = 30000
    panels = [{"image": image, "gt_boxes": [[5, 5, 20, 20]], "boxes": [[30, 30, 45, 60]], "scores": [0.8],
               "title": "style B"},
              {"image": image[..., None], "gt_boxes": [], "boxes": [[1, 1, 9, 9]], "scores": [0.1], "title": "E"}]
    p = detrep.plot_overlays(panels, tmp_path / "overlays.png", score_threshold=0.05)
    rgb = imread(p)[..., :3]
    green = (rgb[..., 1] > 0.7) & (rgb[..., 0] < 0.3) & (rgb[..., 2] < 0.3)
    red = (rgb[..., 0] > 0.7) & (rgb[..., 1] < 0.3) & (rgb[..., 2] < 0.3)
    assert green.sum() > 20 and red.sum() > 20
    with pytest.raises(ValueError, match="panel 0.*image has shape"):
        detrep.plot_overlays([{"image": np.zeros((2, 2, 3, 1)), "gt_boxes": [], "boxes": [], "scores": []}],
                          tmp_path / "x.png")


def test_write_detection_report(tmp_path):
    images = [dict(im, domain="S1|A") for im in HAND] + [dict(NO_FINDING, domain="S2|E")]
    out = detrep.write_detection_report(images, tmp_path, title="demo", seen=["S1|A"], unseen=["S2|E"])
    rep = out["report"]
    assert rep["global"]["ap50"] == pytest.approx(0.6)
    assert rep["table_ap50"][0]["seen"]["S1|A"] == pytest.approx(84.25 / 101)
    assert math.isnan(rep["table_ap50"][0]["unseen"]["S2|E"])  # no lesion in that domain
    assert list(rep["froc"]) == ["all", "S1|A", "S2|E"]
    md = out["markdown"].read_text()
    # all: 1 FP / 3 images before the first hit, 2 / 3 after it; S1|A alone: its one FP is 0.5 per image
    assert "| all | 3 | 3 | 0.333 | 1.000 | 1.000 | 1.000 |" in md
    assert "| S1\\|A | 2 | 3 | 1.000 | 1.000 | 1.000 | 1.000 |" in md
    assert "| model | 83.4 | 83.4 | n/a | n/a |" in md
    import json
    saved = json.loads(out["json"].read_text())
    assert saved["global"]["ap50"] == pytest.approx(0.6) and saved["table_ap50"][0]["unseen"]["S2|E"] is None
    assert out["froc"].stat().st_size > 1000
