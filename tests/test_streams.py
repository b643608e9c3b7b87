"""Algorithm 2 in tf.data: the streams follow the pattern and alternate labels; determinism; resume."""
import numpy as np
import pytest
import tensorflow as tf

from mammodg.records.reader import DatasetError, load_index
from mammodg.records.schema import parse
from mammodg.sampling.pattern import sampling_pattern
from mammodg.sampling.streams import image_batches, make_plan, serialized_stream


def _keys(ds, n):
    out = []
    for raw in ds.take(n):
        r = parse(raw, decode_image=False)
        out.append((r["data_segment"].numpy().decode(), int(r["label"]), r["image_id"].numpy().decode()))
    return out


def test_periodic_stream_follows_pattern_and_alternates(tiny_records):
    index = load_index(tiny_records)
    plan = make_plan(index, tiny_records, "train", "periodic", seed=3)
    segs = sorted(index["splits"]["train"])
    n_min = [min(index["splits"]["train"][s]["0"]["count"], index["splits"]["train"][s]["1"]["count"]) for s in segs]
    pattern = sampling_pattern(n_min)
    got = _keys(serialized_stream(plan, seed=3), 2 * len(pattern) + 5)
    seg_ids = [segs.index(s) for s, _, _ in got]
    np.testing.assert_array_equal(seg_ids[: 2 * len(pattern)], np.tile(pattern, 2))  # Algorithm 2 walks S
    for i in range(len(segs)):  # labels alternate within each segment
        labels = [lab for (s, lab, _) in got if s == segs[i]]
        assert all(a != b for a, b in zip(labels, labels[1:]))
    # over whole periods each segment's share is n_min[i] / N_min, each label half of it
    shares = np.bincount(seg_ids[: 2 * len(pattern)], minlength=len(segs)) / (2 * len(pattern))
    np.testing.assert_allclose(shares, np.array(n_min) / sum(n_min))


def test_streams_reshuffle_and_cover_each_stream(tiny_records):
    index = load_index(tiny_records)
    plan = make_plan(index, tiny_records, "train", "balanced_labels", seed=0)
    n1 = plan.counts[1]
    got = _keys(serialized_stream(plan, seed=0), 4 * n1)
    pos = [i for (_, lab, i) in got if lab == 1]
    first, second = pos[:n1], pos[n1:2 * n1]
    assert sorted(first) == sorted(second) and len(set(first)) == n1  # each pass sees every record once
    assert first != second  # ... in a new order
    assert [lab for _, lab, _ in got[:8]] in ([0, 1] * 4, [1, 0] * 4)


def test_deterministic_and_resume_offset(tiny_records):
    index = load_index(tiny_records)
    plan = make_plan(index, tiny_records, "train", "periodic", seed=1)
    a = _keys(serialized_stream(plan, seed=1), 30)
    b = _keys(serialized_stream(plan, seed=1), 30)
    assert a == b
    resumed = _keys(serialized_stream(plan, seed=1, start=12), 18)
    assert [k[:2] for k in resumed] == [k[:2] for k in a[12:]]  # same segments and labels from sample 12


def test_strategies_and_batches(tiny_records):
    for strategy in ("periodic", "balanced_segments", "balanced_labels", "natural"):
        ds, plan = image_batches(tiny_records, "train", strategy=strategy, batch_size=4, seed=0)
        x, y = next(iter(ds))
        assert x.shape == (4, 64, 48, 1) and x.dtype == tf.float32 and y.shape == (4,)
        assert abs(sum(plan.proportions().values()) - 1) < 1e-9
    bs = make_plan(load_index(tiny_records), tiny_records, "train", "balanced_segments")
    np.testing.assert_allclose(np.bincount(bs.choices // 2) / len(bs.choices), 1 / 3)


def test_missing_label_named(tiny_records, tmp_path):
    import json
    import shutil

    shutil.copytree(tiny_records, tmp_path / "d")
    idx = json.loads((tmp_path / "d" / "dataset.json").read_text())
    seg = sorted(idx["splits"]["train"])[0]
    del idx["splits"]["train"][seg]["1"]
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(idx))
    with pytest.raises(DatasetError, match=seg.replace("|", r"\|")):
        make_plan(idx, tmp_path / "d", "train", "periodic")
    with pytest.raises(ValueError, match="strategy"):
        make_plan(idx, tmp_path / "d", "train", "bogus")


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from mammodg.sampling.streams import image_batches
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
ds, _ = image_batches(sys.argv[1], "train", strategy="periodic", batch_size=4, seed=0)
x, y = next(iter(strategy.experimental_distribute_dataset(ds)))
print("replicas", [t.shape[0] for t in strategy.experimental_local_results(x)])
"""


def test_mirrored_strategy_splits_global_batch(tiny_records):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", MIRRORED, str(tiny_records)], capture_output=True, text=True, timeout=300)
    assert "replicas [2, 2]" in out.stdout, out.stderr[-2000:]
