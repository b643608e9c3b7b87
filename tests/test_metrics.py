"""Metrics and reports: WLL, AUC, ROC, operating points, vectorised bootstrap, per-segment report, figures."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score, roc_curve
from sklearn.utils.class_weight import compute_sample_weight

from mammodg.metrics import (
    auc,
    bootstrap_auc,
    bootstrap_delta_auc,
    classification_report,
    downsample_curve,
    none_if_nan,
    operating_points,
    positive_top1_hits,
    roc,
    weighted_log_loss,
)
from mammodg.metrics.bootstrap import _auc_resamples
from mammodg.report import markdown_report, plot_roc, plot_validation_curves, write_report


def _data(n=600, prev=0.2, sep=1.0, seed=0, decimals=None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prev).astype(int)
    p = 1 / (1 + np.exp(-rng.normal(sep * y - 1.0, 1.0)))
    if decimals is not None:
        p = np.round(p, decimals)  # many ties
    return y, p


def _brute_auc(y, s):
    """Independent O(n_pos * n_neg) definition: P(s+ > s-) + P(s+ == s-) / 2."""
    pos, neg = s[y == 1][:, None], s[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


# ------------------------------------------------------------------------------------------- WLL
def test_weighted_log_loss_matches_direct_formula_and_sklearn():
    y, p = _data(n=500, prev=0.1, seed=1)
    w = np.where(y == 1, y.size / (2 * y.sum()), y.size / (2 * (y.size - y.sum())))
    direct = -np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / np.sum(w)
    ref = log_loss(y, p, sample_weight=compute_sample_weight("balanced", y))
    got = weighted_log_loss(y, p)
    assert got == pytest.approx(direct, rel=1e-10)
    assert got == pytest.approx(ref, rel=1e-10)
    # class-balanced: differs from the plain mean log loss on an imbalanced set
    assert abs(got - log_loss(y, p)) > 1e-3


def test_weighted_log_loss_single_class_and_clipping():
    p = np.array([0.1, 0.3, 0.2])
    assert weighted_log_loss(np.zeros(3, int), p) == pytest.approx(-np.mean(np.log(1 - p)))
    assert weighted_log_loss(np.ones(3, bool), p) == pytest.approx(-np.mean(np.log(p)))
    v = weighted_log_loss([0, 1], [1.0, 0.0])  # clipped, finite
    assert np.isfinite(v) and v == pytest.approx(-np.log(1e-7), rel=1e-6)
    with pytest.raises(ValueError):
        weighted_log_loss([0, 2], [0.1, 0.2])


def test_weighted_log_loss_multiclass_matches_sklearn_with_balanced_weights():
    rng = np.random.default_rng(3)
    y = rng.choice(5, size=400, p=[0.6, 0.2, 0.1, 0.07, 0.03])
    logits = rng.normal(size=(400, 5)) + 2 * np.eye(5)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = log_loss(y, probs, sample_weight=compute_sample_weight("balanced", y), labels=range(5))
    assert weighted_log_loss(y, probs) == pytest.approx(ref, rel=1e-10)
    present = y < 3  # only the classes present weigh: the mean of their mean losses
    nll = -np.log(probs[present, y[present]])
    assert weighted_log_loss(y[present], probs[present]) == pytest.approx(np.mean([nll[y[present] == c].mean() for c in range(3)]))
    two = np.stack([1 - probs[:, 0], probs[:, 0]], 1)  # two columns: the binary WLL of column 1 (away from the clip)
    assert weighted_log_loss(y == 0, two) == pytest.approx(weighted_log_loss(y == 0, probs[:, 0]), rel=1e-12)
    assert weighted_log_loss([0, 1], [[0.0, 1.0], [1.0, 0.0]]) == pytest.approx(-np.log(1e-7))  # clipped, finite
    with pytest.raises(ValueError, match="class indices 0..4"):
        weighted_log_loss([0, 5], probs[:2])
    with pytest.raises(ValueError, match="2 rows but y_true has 3"):
        weighted_log_loss([0, 1, 2], probs[:2])


def test_none_if_nan():
    assert none_if_nan(float("nan")) is None and none_if_nan(None) is None and none_if_nan(np.float32("nan")) is None
    v = none_if_nan(np.float32(0.25))
    assert v == 0.25 and type(v) is float
    json.dumps([none_if_nan(x) for x in (np.nan, 1, np.float64(2.5))], allow_nan=False)
    assert none_if_nan(float("inf")) is None and none_if_nan(-np.inf) is None


def test_positive_top1_hits_against_brute_force():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(6, 4))
    z2 = z1 * rng.uniform(0.5, 2.0, (6, 1)) + rng.normal(scale=0.7, size=(6, 4))  # noisy, rescaled positives
    hits = positive_top1_hits(z1, z2)
    flat = np.concatenate([z1, z2])
    for i, e in enumerate(flat):
        cos = [(e @ f) / np.linalg.norm(e) / np.linalg.norm(f) if k != i else -np.inf for k, f in enumerate(flat)]
        assert hits[i] == (int(np.argmax(cos)) == (i + 6) % 12)
    assert 0 < hits.mean() < 1
    assert positive_top1_hits(z1, 3 * z1).all()  # a positive along the same direction is always found


# ------------------------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_auc_matches_sklearn_with_ties(decimals):
    y, s = _data(n=700, prev=0.15, seed=2, decimals=decimals)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)


def test_auc_single_class_is_nan():
    assert np.isnan(auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert np.isnan(auc([0, 0], [0.1, 0.5]))


def test_roc_matches_sklearn():
    y, s = _data(n=400, seed=3, decimals=2)
    fpr, tpr, thr = roc(y, s)
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_array_equal(thr[1:], th2[1:])
    assert np.isinf(thr[0])
    # trapezoid area of the full curve is the AUC
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # thinning keeps end points and stays within the curve's point set
    df, dt = downsample_curve(fpr, tpr, max_points=20)
    assert len(df) <= 22 and (df[0], dt[0]) == (0.0, 0.0) and (df[-1], dt[-1]) == (1.0, 1.0)


def test_rank_auc_of_resamples_matches_sklearn():
    y, s = _data(n=300, prev=0.2, seed=4, decimals=2)
    rng = np.random.default_rng(9)
    idx = rng.integers(0, y.size, size=(25, y.size))
    got = _auc_resamples(y, s, idx)
    ref = [roc_auc_score(y[i], s[i]) for i in idx]
    np.testing.assert_allclose(got, ref, atol=1e-12)
    # a resample with a single class gives nan
    one = np.flatnonzero(y == 0)[:10]
    assert np.isnan(_auc_resamples(y, s, one[None, :])[0])


# ------------------------------------------------------------------------------------ bootstrap
KEYS = {"auc_a", "auc_b", "delta", "ci_low", "ci_high", "p_value", "auc_a_ci", "auc_b_ci", "n_boot_used"}


def test_bootstrap_delta_point_estimates_and_keys():
    y, a = _data(n=400, seed=5, sep=0.8)
    _, b = _data(n=400, seed=5, sep=1.2)
    r = bootstrap_delta_auc(y, a, b, n_boot=500, seed=1)
    assert KEYS <= set(r)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert r["auc_b"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert r["delta"] == pytest.approx(r["auc_b"] - r["auc_a"], abs=1e-15)
    assert r["n_boot_used"] == 500
    assert r["ci_low"] <= r["ci_high"]
    assert r["auc_a_ci"][0] < r["auc_a"] < r["auc_a_ci"][1]
    assert 0.0 <= r["p_value"] <= 1.0
    # deterministic under seed, different with another seed
    assert bootstrap_delta_auc(y, a, b, n_boot=500, seed=1) == r
    assert bootstrap_delta_auc(y, a, b, n_boot=500, seed=2)["ci_low"] != r["ci_low"]


def test_bootstrap_delta_identical_models():
    y, a = _data(n=300, seed=6, decimals=2)
    r = bootstrap_delta_auc(y, a, a.copy(), n_boot=300)
    assert r["delta"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0)
    assert r["p_value"] == 1.0
    assert r["auc_a_ci"] == r["auc_b_ci"]


def test_bootstrap_delta_detects_better_model():
    rng = np.random.default_rng(7)
    y = (rng.random(300) < 0.3).astype(int)
    a = rng.random(300)  # uninformative
    b = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.15, 300), 0, 1)  # good
    r = bootstrap_delta_auc(y, a, b, n_boot=1000, seed=0)
    assert r["delta"] > 0.3
    assert r["ci_low"] > 0 and r["p_value"] < 0.05
    # sign convention: swapping a and b flips delta and the CI
    s = bootstrap_delta_auc(y, b, a, n_boot=1000, seed=0)
    assert s["delta"] == pytest.approx(-r["delta"])
    assert s["ci_high"] == pytest.approx(-r["ci_low"]) and s["ci_high"] < 0


def test_bootstrap_matches_naive_loop_on_same_indices():
    """The vectorised bootstrap equals a per-resample sklearn loop over the same RNG draws."""
    y, a = _data(n=120, prev=0.3, seed=8, decimals=1)
    _, b = _data(n=120, prev=0.3, seed=18, decimals=1)
    n_boot = 200
    rng = np.random.default_rng(3)
    deltas = []
    while len(deltas) < n_boot:  # same draws: one (b, n) block, single-class rows redrawn
        idx = rng.integers(0, y.size, size=(n_boot - len(deltas), y.size))
        for i in idx:
            if 0 < y[i].sum() < y.size:
                deltas.append(roc_auc_score(y[i], b[i]) - roc_auc_score(y[i], a[i]))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    r = bootstrap_delta_auc(y, a, b, n_boot=n_boot, seed=3)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    d = np.array(deltas)
    assert r["p_value"] == pytest.approx(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))


def test_bootstrap_redraws_single_class_resamples():
    y = np.array([1, 0, 0, 0, 0, 0, 0, 0])  # one positive: ~34% of resamples have none
    s = np.linspace(0, 1, 8)
    r = bootstrap_auc(y, s, n_boot=200, seed=0)
    assert r["n_boot_used"] == 200 and r["n_redrawn"] > 30
    r = bootstrap_auc(np.zeros(5, int), s[:5], n_boot=50)
    assert np.isnan(r["auc"]) and r["n_boot_used"] == 0


def test_bootstrap_auc_ci_contains_estimate():
    y, s = _data(n=500, seed=9)
    r = bootstrap_auc(y, s, n_boot=400, seed=0)
    assert r["auc"] == pytest.approx(roc_auc_score(y, s))
    assert r["ci_low"] < r["auc"] < r["ci_high"]


def test_bootstrap_delta_is_fast():
    y, a = _data(n=5000, prev=0.1, seed=10)
    _, b = _data(n=5000, prev=0.1, seed=11)
    t = time.perf_counter()
    r = bootstrap_delta_auc(y, a, b, n_boot=2000, seed=0)
    elapsed = time.perf_counter() - t
    assert r["n_boot_used"] == 2000
    assert elapsed < 5.0, f"bootstrap_delta_auc took {elapsed:.2f}s (target well under 2 s)"


# ------------------------------------------------------------------------------ operating points
def test_operating_points_direct_count():
    y, s = _data(n=500, seed=12, decimals=1)  # ties exactly at the thresholds
    ops = operating_points(y, s)
    assert [op["threshold"] for op in ops] == [0.2, 0.4, 0.6, 0.8]
    for op in ops:
        t = op["threshold"]
        assert op["tpr"] == pytest.approx(np.mean(s[y == 1] >= t))
        assert op["fpr"] == pytest.approx(np.mean(s[y == 0] >= t))
        assert op["sensitivity"] == op["tpr"] and op["specificity"] == pytest.approx(1 - op["fpr"])
    # each OP is a point of the ROC curve
    fpr, tpr, thr = roc(y, s)
    for op in ops:
        k = np.flatnonzero(thr >= op["threshold"])[-1]
        assert (fpr[k], tpr[k]) == pytest.approx((op["fpr"], op["tpr"]))


# -------------------------------------------------------------------------------------- report
@pytest.fixture(scope="module")
def segmented():
    rng = np.random.default_rng(13)
    ys, ss, segs = [], [], []
    for name, n, prev, shift in [("S1|Ma", 400, 0.35, 0.0), ("S2|Ma", 500, 0.05, -0.8), ("S3|Mb", 60, 0.0, 0.0)]:
        y = (rng.random(n) < prev).astype(int)
        ys.append(y)
        ss.append(1 / (1 + np.exp(-rng.normal(shift + 1.5 * y - 0.5, 1.0))))
        segs += [name] * n
    y, s, seg = np.concatenate(ys), np.concatenate(ss), np.array(segs)
    return y, s, seg, classification_report(y, s, seg, n_boot=300, seed=0)


def test_classification_report_per_segment_values(segmented):
    y, s, seg, rep = segmented
    assert set(rep["segments"]) == {"S1|Ma", "S2|Ma", "S3|Mb"}
    json.dumps(rep, allow_nan=False)  # JSON-serialisable as is
    for name, g in [("__global__", rep["global"])] + list(rep["segments"].items()):
        m = np.ones(y.size, bool) if name == "__global__" else seg == name
        assert g["n"] == m.sum() and g["n_pos"] == y[m].sum()
        assert g["wll"] == pytest.approx(weighted_log_loss(y[m], s[m]))
        ops = operating_points(y[m], s[m])
        for got, ref in zip(g["operating_points"], ops):
            assert got["fpr"] == pytest.approx(ref["fpr"])
            assert (got["tpr"] is None) if np.isnan(ref["tpr"]) else got["tpr"] == pytest.approx(ref["tpr"])
        if name == "S3|Mb":  # negatives only
            assert g["auc"] is None and g["auc_ci"] is None and g["roc"] is None and "positives" in g["note"]
            continue
        assert g["auc"] == pytest.approx(roc_auc_score(y[m], s[m]))
        b = bootstrap_auc(y[m], s[m], n_boot=300, seed=0)
        assert g["auc_ci"] == pytest.approx([b["ci_low"], b["ci_high"]])
        assert g["note"] is None
        assert 2 <= len(g["roc"]["fpr"]) == len(g["roc"]["tpr"]) <= 402
        # the thinned curve keeps the AUC
        assert np.trapezoid(g["roc"]["tpr"], g["roc"]["fpr"]) == pytest.approx(g["auc"], abs=5e-3)


def test_roc_json_is_thinned():
    y, s = _data(n=3000, seed=14)
    rep = classification_report(y, s, None, n_boot=50)
    assert rep["segments"] == {}
    assert len(rep["global"]["roc"]["fpr"]) <= 402


def _history():
    out = []
    for step in range(0, 5001, 1000):
        f = step / 5000
        out.append({"step": step, "global": {"wll": 0.7 - 0.2 * f, "auc": 0.5 + 0.3 * f},
                    "segments": {"S1|Ma": {"wll": 0.7 - 0.1 * f, "auc": 0.5 + 0.2 * f},
                                 "S2|Ma": {"wll": 0.7 - 0.05 * f, "auc": None if step == 0 else 0.6}}})
    return out


def test_plots_and_markdown(segmented, tmp_path):
    *_, rep = segmented
    p = plot_roc(rep, tmp_path / "roc.png")
    q = plot_validation_curves(_history(), tmp_path / "curves.png")
    for f in (p, q):
        assert f.exists() and f.stat().st_size > 20_000
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown_report(rep, "Test run")
    assert md.startswith("# Test run")
    for name in ("S1\\|Ma", "S2\\|Ma", "S3\\|Mb", "Global"):
        assert name in md
    assert f"{rep['segments']['S1|Ma']['auc']:.4f}" in md
    assert "OP@0.2" in md and "OP@0.8" in md and "no positives" in md
    table = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len({ln.replace("\\|", "").count("|") for ln in table}) == 1  # escaped names keep the column count


def test_write_report(segmented, tmp_path):
    *_, rep = segmented
    paths = write_report(rep, tmp_path / "out", "Run X", history=_history())
    assert set(paths) == {"json", "markdown", "roc", "validation_curves"}
    assert all(p.exists() and p.stat().st_size > 500 for p in paths.values())
    back = json.loads(paths["json"].read_text())
    assert back["title"] == "Run X" and back["segments"]["S2|Ma"]["n"] == rep["segments"]["S2|Ma"]["n"]
    assert set(write_report(rep, tmp_path / "o2", "Run Y")) == {"json", "markdown", "roc"}
