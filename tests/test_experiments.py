"""The pipelines' multi-seed helpers: spread over seeds and significance counts against direct numpy
computations, the periodic-sampling report's paired ΔAUC sign against scikit-learn, and the single-segment
dataset view read back by the sampler and the shard verifier."""
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))

from experiment_tools import delta_spread, segment_view, spread  # noqa: E402
from periodic_report import aggregate, paired_deltas  # noqa: E402


def test_spread_matches_numpy_and_skips_missing():
    v = [0.71, 0.64, None, 0.80, float("nan")]
    ok = np.array([0.71, 0.64, 0.80])
    s = spread(v)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(ok.mean())
    assert s["std"] == pytest.approx(np.sqrt(((ok - ok.mean()) ** 2).sum() / 2))  # sample std, ddof 1
    assert (s["min"], s["max"]) == (0.64, 0.80)
    assert spread([0.5])["std"] == 0.0
    assert spread([None])["mean"] is None


def test_delta_spread_counts_significant_seeds_by_sign():
    ds = [{"delta": 0.05, "p_value": 0.01}, {"delta": -0.02, "p_value": 0.04}, {"delta": 0.03, "p_value": 0.2},
          {"delta": float("nan"), "p_value": float("nan")}]
    s = delta_spread(ds)
    assert (s["n"], s["n_sig_pos"], s["n_sig_neg"]) == (3, 1, 1)
    assert s["mean"] == pytest.approx(np.mean([0.05, -0.02, 0.03]))


def test_aggregate_over_seeds_equals_direct_numpy():
    rng = np.random.default_rng(3)
    models, cols, seeds = ["periodic", "balanced_labels", "baseline"], ["val:S1", "test:S3"], [0, 1, 2]
    auc = rng.uniform(0.5, 1.0, (len(seeds), len(models), len(cols)))
    delta = rng.normal(0, 0.05, (len(seeds), len(cols)))
    p = np.array([[0.01, 0.5], [0.03, 0.02], [0.2, 0.001]])
    per_seed = {k: {"models": {m: {"auc": {c: {"auc": auc[i, j, n]} for n, c in enumerate(cols)}}
                               for j, m in enumerate(models)},
                    "delta": {"balanced_labels": {"periodic": {c: {"delta": delta[i, n], "p_value": p[i, n]}
                                                               for n, c in enumerate(cols)}}}}
                for i, k in enumerate(seeds)}
    agg = aggregate(per_seed)
    for j, m in enumerate(models):
        for n, c in enumerate(cols):
            a = agg["auc"][m][c]
            assert a["mean"] == pytest.approx(auc[:, j, n].mean())
            assert a["std"] == pytest.approx(auc[:, j, n].std(ddof=1))
            assert (a["min"], a["max"]) == (auc[:, j, n].min(), auc[:, j, n].max())
    for n, c in enumerate(cols):
        d = agg["delta"]["balanced_labels"]["periodic"][c]
        assert d["mean"] == pytest.approx(delta[:, n].mean())
        assert d["std"] == pytest.approx(delta[:, n].std(ddof=1))
        assert d["n_sig_pos"] == int(((p[:, n] < 0.05) & (delta[:, n] > 0)).sum())
        assert d["n_sig_neg"] == int(((p[:, n] < 0.05) & (delta[:, n] < 0)).sum())


def test_paired_deltas_are_model_minus_reference():
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.3).astype(np.int64)
    segs = np.where(rng.random(120) < 0.5, "S1|A", "S2|B")
    good, weak = y + rng.normal(0, 0.5, 120), y + rng.normal(0, 1.5, 120)
    raw = {"ref": {"val": (weak, y, segs), "test": (weak, y, segs)},
           "model": {"val": (good, y, segs), "test": (good, y, segs)}}
    d = paired_deltas(raw, ("ref",), n_boot=50, seed=0)["ref"]["model"]
    assert set(d) == {"val:S1|A", "val:S2|B", "val:pooled", "test:S1|A", "test:S2|B"}
    m = segs == "S1|A"
    want = roc_auc_score(y[m], good[m]) - roc_auc_score(y[m], weak[m])
    assert d["val:S1|A"]["delta"] == pytest.approx(want)
    assert d["val:pooled"]["delta"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, weak))


def _fake_shard(path: Path, n: int) -> None:
    """TFRecord framing (length, crc, payload, crc) with n records; the verifier counts headers only."""
    with open(path, "wb") as f:
        for _ in range(n):
            f.write(struct.pack("<Q", 3) + b"\0" * 4 + b"abc" + b"\0" * 4)


def test_segment_view_restricts_sampling_to_one_segment(tmp_path):
    from mammodg.records.reader import DatasetError, INDEX_FORMAT, streams
    from mammodg.records.verify import verify
    from mammodg.sampling.streams import make_plan

    data = tmp_path / "tfrecords"
    splits, total = {}, 0
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for seg in (("S1|A", "S2|B") if split != "test" else ("S3|C",)):
            for lab in ("0", "1"):
                rel = f"{split}/{seg.replace('|', '_')}_{lab}.tfrecord"
                (data / split).mkdir(parents=True, exist_ok=True)
                _fake_shard(data / rel, n + int(lab))
                splits.setdefault(split, {}).setdefault(seg, {})[lab] = {"count": n + int(lab),
                                                                        "shards": [{"path": rel, "count": n + int(lab)}]}
                total += n + int(lab)
    (data / "dataset.json").write_text(json.dumps({"format": INDEX_FORMAT, "records": total, "splits": splits,
                                                   "segments": ["S1|A", "S2|B", "S3|C"], "image_shape": [8, 6]}))
    view_dir = tmp_path / "view"
    view = segment_view(data, view_dir, ["S1|A"])
    assert sorted(view["splits"]) == ["train", "val"] and view["records"] == 4 + 5 + 2 + 3
    assert verify(view_dir) == {"shards": 4, "records": 14}
    got = streams(view, view_dir, "train")
    full = streams(json.loads((data / "dataset.json").read_text()), data, "train")
    assert sorted(got) == [("S1|A", 0), ("S1|A", 1)]
    for k, (paths, count) in got.items():
        assert [Path(p).resolve() for p in paths] == [Path(p).resolve() for p in full[k][0]] and count == full[k][1]
    plan = make_plan(view, view_dir, "train", "balanced_labels", seed=0)
    assert plan.counts == [4, 5]
    with pytest.raises(DatasetError, match="no segment"):
        segment_view(data, tmp_path / "bad", ["S9|Z"])
