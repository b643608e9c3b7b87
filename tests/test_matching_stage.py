"""``--stage matching``: stand-in candidates and their pair labels on a hand-made breast, a few training steps
from the CLI on the tiny records, the exported ``serve_pairs`` in a fresh plain-TensorFlow process, and
``mammodg evaluate --stage matching`` (accuracy and AP before/after) against references built from it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from mammodg.augment.matching import box_iou
from mammodg.augment.matching_pairs import candidate_set, standin_candidates
from mammodg.cli import main
from mammodg.config import MatchingConfig, TrainConfig, load
from mammodg.metrics.detection import average_precision


def breast_view(gt, h=64, w=48, domain="A", image_id="x"):
    """A stored image: tissue (values 1000..) in the left 30 columns, 0 outside; its ground-truth boxes."""
    img = np.zeros((h, w, 1), np.uint16)
    img[:, :30] = 1000 + np.arange(h * 30, dtype=np.uint16).reshape(h, 30, 1)
    return {"image": img, "gt_boxes": np.asarray(gt, np.float64).reshape(-1, 4), "domain": domain, "image_id": image_id}


def test_standin_candidates_and_pair_labels():
    rng = np.random.default_rng(0)
    m = MatchingConfig(roi_size=32)
    one = {"CC": breast_view([[5, 10, 15, 20]]), "MLO": breast_view([[8, 30, 20, 42]])}
    two = {"CC": breast_view([[2, 2, 10, 10], [12, 40, 22, 50]]), "MLO": breast_view([[4, 4, 12, 12]])}
    cands = [standin_candidates(b[v]["image"], b[v]["gt_boxes"], rng, n_false=2) for b in (one, two) for v in ("CC", "MLO")]
    for (boxes, scores), v in zip(cands, [one["CC"], one["MLO"], two["CC"], two["MLO"]]):
        n = len(v["gt_boxes"])
        assert len(boxes) == n + 2 and len(scores) == len(boxes) and np.all((scores >= 0) & (scores < 1))
        np.testing.assert_array_equal(boxes[:n], v["gt_boxes"])
        fp = boxes[n:]
        assert box_iou(fp, v["gt_boxes"]).max() < 0.1
        centres = np.floor((fp[:, :2] + fp[:, 2:]) / 2).astype(int)
        assert np.all(v["image"][centres[:, 1], centres[:, 0], 0] > 0)  # on breast tissue
    data = candidate_set([one, two], cands, m)
    # breast one: 3 CC x 3 MLO pairs, only GT x GT matches; breast two: counts differ -> no known match
    assert len(data["y"]) == 9 + 4 * 3 and data["rois"].shape == (3 + 3 + 4 + 3, 32, 32, 1)
    assert data["rois"].dtype == np.uint16 and data["geom"].shape == (13, 3)
    pos = [(int(a), int(b)) for a, b, y in zip(data["a"], data["b"], data["y"]) if y]
    assert pos == [(0, 3)]
    assert set(data["a"][:9]) == {0, 1, 2} and set(data["b"][:9]) == {3, 4, 5}
    assert set(data["a"][9:]) == {6, 7, 8, 9} and set(data["b"][9:]) == {10, 11, 12}
    np.testing.assert_allclose(data["geom"][0, 2], 10 / 64, rtol=1e-6)  # ROI size in image heights
    assert [list(im["rois"]) for im in data["images"]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9], [10, 11, 12]]


@pytest.fixture(scope="module")
def run(tiny_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("matching") / "run"
    rc = main(["train", "--stage", "matching", "--set", f"data_dir={tiny_records}", "--set", f"run_dir={out}",
               "--set", "steps=4", "--set", "val_every=2", "--set", "batch_size=8", "--set", "matching.roi_size=32",
               "--set", "matching.backbone_width=4", "--set", "matching.hidden_dim=16", "--set", "matching.embedding_dim=8"])
    assert rc == 0
    return out


def test_train_from_cli(run):
    hist = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 4]
    for h in hist:
        g = h["global"]
        assert h["monitor"] == g["loss"] and np.isfinite(g["loss"]) and 0 <= g["accuracy"] <= 1
    assert (run / "saved_model" / "saved_model.pb").is_file()


SERVE = textwrap.dedent("""
    import importlib.abc, sys

    class NoMammodg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "mammodg":
                raise ImportError("the SavedModel must not need mammodg")

    sys.meta_path.insert(0, NoMammodg())
    import numpy as np
    import tensorflow as tf

    d = np.load(sys.argv[1])
    m = tf.saved_model.load(sys.argv[2])
    assert sorted(m.signatures) == ["serve_pairs"], sorted(m.signatures)
    out = m.signatures["serve_pairs"](**{k: tf.constant(d[k]) for k in ("roi_cc", "roi_mlo", "geom_cc", "geom_mlo")})
    np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
""")


def test_export_fresh_process_and_evaluate(run, tmp_path, capsys):
    from mammodg.augment.matching_pairs import load_matcher, pair_outputs
    from mammodg.stages.matching import matching_data

    cfg = load(TrainConfig, run / "config.yaml")
    data = matching_data(cfg, "val")
    a, b = data["a"], data["b"]
    inputs = {"roi_cc": data["rois"][a], "roi_mlo": data["rois"][b], "geom_cc": data["geom"][a], "geom_mlo": data["geom"][b]}
    np.savez(tmp_path / "in.npz", **inputs)
    (tmp_path / "serve.py").write_text(SERVE)
    proc = subprocess.run([sys.executable, str(tmp_path / "serve.py"), str(tmp_path / "in.npz"),
                           str(run / "saved_model"), str(tmp_path / "out.npz")], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = dict(np.load(tmp_path / "out.npz"))
    model = load_matcher(run, cfg)
    ref = pair_outputs(model, cfg, inputs["roi_cc"], inputs["geom_cc"], inputs["roi_mlo"], inputs["geom_mlo"])
    np.testing.assert_allclose(served["distance"], np.asarray(ref["distance"]), rtol=1e-4, atol=1e-5)
    d, m = served["distance"], cfg.matching.margin
    np.testing.assert_allclose(served["match_score"], np.clip(1 - d / m, 0, 1), atol=1e-6)

    assert main(["evaluate", "--run", str(run), "--stage", "matching"]) == 0
    assert "ap50_change" in capsys.readouterr().out
    rep = json.loads((run / "matching_val" / "report.json").read_text())
    assert rep["pairs"] == len(d) and rep["positives"] == int(data["y"].sum()) and rep["chance_accuracy"] == 0.5
    assert rep["accuracy"] == pytest.approx(accuracy_score(data["y"], served["match_score"] > 0.5), abs=1e-9)
    # rescoring by hand from the served scores: a candidate's best match in the other view
    best = np.zeros(len(data["rois"]))
    for i, j, s in zip(a, b, served["match_score"]):
        best[i], best[j] = max(best[i], s), max(best[j], s)
    after = [{**im, "scores": np.where(best[im["rois"]] > 0.5, im["scores"] + 0.5 * best[im["rois"]] * (1 - im["scores"]),
                                       im["scores"])} for im in data["images"]]
    ap = lambda ims: average_precision(ims, iou_thresholds=(0.5,))["ap50"]  # noqa: E731
    assert rep["ap50_before"] == pytest.approx(ap(data["images"]), abs=1e-6)
    assert rep["ap50_after"] == pytest.approx(ap(after), abs=1e-6)
    assert rep["ap50_change"] == pytest.approx(rep["ap50_after"] - rep["ap50_before"], abs=1e-9)


def test_detection_run_candidates(tiny_records, tmp_path):
    """With ``matching.detection_run`` the candidates are that run's exported detections, run once and cached
    per image in the matching run folder (a later read takes the cache, top ``max_candidates`` by score)."""
    from mammodg.augment.matching_pairs import breasts, detection_candidates

    det = tmp_path / "det"
    assert main(["train", "--stage", "detection", *[a for s in (
        f"data_dir={tiny_records}", f"run_dir={det}", "detection.backbone=tiny", "detection.input_size=[64,48]",
        "detection.width=16", "detection.tower_convs=1", "detection.groups=4", "detection.score_threshold=0.0",
        "batch_size=4", "steps=2", "val_every=2") for a in ("--set", s)]]) == 0
    run = tmp_path / "match"
    assert main(["train", "--stage", "matching", *[a for s in (
        f"data_dir={tiny_records}", f"run_dir={run}", f"matching.detection_run={det}", "matching.max_candidates=3",
        "matching.roi_size=32", "matching.backbone_width=4", "matching.hidden_dim=16", "matching.embedding_dim=8",
        "steps=2", "val_every=2", "batch_size=8", "export=false") for a in ("--set", s)]]) == 0
    cache = json.loads((run / "detections_train.json").read_text())
    views = [b[v] for b in breasts(tiny_records, "train", MatchingConfig().lesion_classes) for v in ("CC", "MLO")]
    assert set(cache) == {v["image_id"] for v in views} and (run / "detections_val.json").is_file()
    first = views[0]["image_id"]
    scores = np.asarray(cache[first]["scores"])
    assert len(scores) > 3
    cache[first] = {"boxes": [[1, 2, 9, 12], [3, 3, 8, 8], [0, 0, 5, 5], [2, 2, 4, 4]], "scores": [0.1, 0.9, 0.5, 0.7]}
    (run / "detections_train.json").write_text(json.dumps(cache))
    boxes, s = detection_candidates(tmp_path / "absent", views[:1], run / "detections_train.json", 3)[0]
    np.testing.assert_array_equal(s, [0.9, 0.7, 0.5])
    np.testing.assert_array_equal(boxes, [[3, 3, 8, 8], [2, 2, 4, 4], [0, 0, 5, 5]])


def test_bad_inputs_are_one_line_errors(tiny_records, tmp_path, capsys):
    base = ["train", "--stage", "matching", "--set", f"data_dir={tiny_records}", "--set", f"run_dir={tmp_path / 'r'}",
            "--set", "matching.roi_size=32", "--set", "steps=2", "--set", "val_every=2"]
    assert main([*base, "--set", f"matching.detection_run={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nope" / "saved_model") in err[0]
    assert main([*base, "--set", "matching.backbone=resnet50", "--set", f"matching.backbone_from={tmp_path / 'c'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backbone.weights.h5 not found" in err[0]
    assert main([*base, "--set", "matching.roi_size=8"]) == 2
    assert "roi_size" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing trained or written


def test_pair_flip_is_synchronous():
    """flip=1: both crops of every pair are the unflipped batch mirrored left-right; geometry and labels kept."""
    from mammodg.augment.matching_pairs import pair_dataset

    rng = np.random.default_rng(3)
    data = {"rois": rng.integers(1, 65535, (6, 32, 32, 1)).astype(np.uint16), "geom": rng.random((6, 3)).astype(np.float32),
            "a": np.array([0, 1, 2]), "b": np.array([3, 4, 5]), "y": np.array([1, 0, 0])}
    plain = next(iter(pair_dataset(data, 7, 4, flip=0.0)))
    flipped = next(iter(pair_dataset(data, 7, 4, flip=1.0)))
    for k in ("roi_cc", "roi_mlo"):
        np.testing.assert_array_equal(flipped[0][k].numpy(), plain[0][k].numpy()[:, :, ::-1])
    for k in ("geom_cc", "geom_mlo"):
        np.testing.assert_array_equal(flipped[0][k].numpy(), plain[0][k].numpy())
    np.testing.assert_array_equal(flipped[1].numpy(), plain[1].numpy())
    assert (plain[1].numpy() == 1).any()  # positives drawn although 1 of 3 pairs


def test_roi_inputs_are_unit_values_with_zero_outside():
    from mammodg.augment.matching_pairs import roi_inputs

    x = np.array([0, 1, 65535, 32768], np.uint16).reshape(1, 2, 2, 1)
    np.testing.assert_allclose(roi_inputs(x).numpy().ravel(), [0, 0, 1, 32767 / 65534], rtol=1e-6)


def test_pair_scores_loss_is_eq3_and_accuracy_at_half_margin():
    from mammodg.losses import max_margin_contrastive
    from mammodg.stages.matching import pair_scores

    rng = np.random.default_rng(5)
    f1, f2, y = rng.normal(0, 4, (12, 3)), rng.normal(0, 4, (12, 3)), np.arange(12) % 3 == 0
    d = np.linalg.norm(f1 - f2, axis=1)
    s = pair_scores(d, y.astype(int), 10.0)
    assert s["loss"] == pytest.approx(float(max_margin_contrastive(f1, f2, y, 10.0)), rel=1e-5)
    assert s["accuracy"] == pytest.approx(accuracy_score(y, d < 5.0))
    assert s["positive_accuracy"] == pytest.approx(np.mean(d[y] < 5.0)) and s["positives"] == 4 and s["pairs"] == 12
