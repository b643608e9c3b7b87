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


# Pooled strategies: the segment composition of consecutive batches is that of i.i.d. draws ----------------

POOL = {"A": (256, 128), "B": (200, 160), "C": (120, 64), "D": (40, 40)}  # records per label (0, 1)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory):
    """Tiny records (segment, label, id only) in 64-record shards, each segment's records in writer
    order, with the index make_plan reads; shards are larger than the shuffle buffers used below."""
    import json

    out = tmp_path_factory.mktemp("pool")
    splits, rid = {}, 0
    for si, (seg, counts) in enumerate(POOL.items()):
        for label, count in enumerate(counts):
            shards = []
            for k, lo in enumerate(range(0, count, 64)):
                path = f"train/{seg}/label{label}-{k:05d}.tfrecord"
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                with tf.io.TFRecordWriter(str(out / path)) as w:
                    for _ in range(min(64, count - lo)):
                        feats = {f: tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))
                                 for f, v in (("segment", si), ("label", label), ("id", rid))}
                        w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
                        rid += 1
                shards.append({"path": path, "count": min(64, count - lo)})
            splits.setdefault(seg, {})[str(label)] = {"count": count, "patients": count, "shards": shards}
    index = {"format": "mammodg-tfrecords/1", "splits": {"train": splits}}
    (out / "dataset.json").write_text(json.dumps(index))
    return out


def _segments_labels(ds, n_batches, batch=32):
    spec = {k: tf.io.FixedLenFeature([], tf.int64) for k in ("segment", "label", "id")}
    ds = ds.map(lambda raw: tf.io.parse_single_example(raw, spec)).batch(batch).take(n_batches)
    got = [(b["segment"].numpy(), b["label"].numpy(), b["id"].numpy()) for b in ds]
    return tuple(np.stack(x) for x in zip(*got))


def _composition_test(seg, lab, strata):
    """Chi-square of per-batch segment counts against i.i.d. draws from each stratum's pool.

    ``strata`` maps a label (None: the whole batch) to its pool's records per segment. A pass draws
    without replacement, which shrinks the variance of a batch's counts by (N - n) / (N - 1) (0.97 for
    32 of 1,008); the statistic is divided by it. Returns the two-sided p-value (blocked batches are
    overdispersed; batches too regular, as from a round-robin over equal shards, underdispersed) and
    the fraction of batches more than 70% one segment."""
    from scipy import stats

    k = len(POOL)
    stat, dof = 0.0, 0
    for label, pool in strata.items():
        mask = np.ones_like(seg, bool) if label is None else lab == label
        counts = np.stack([((seg == s) & mask).sum(1) for s in range(k)], 1)
        n = mask.sum(1, keepdims=True)
        expected = n * (pool / pool.sum())[None, :]
        finite_pool = (pool.sum() - n) / (pool.sum() - 1)
        stat += float((((counts - expected) ** 2) / expected / finite_pool).sum())
        dof += counts.shape[0] * (k - 1)
    p = 2 * min(stats.chi2.sf(stat, dof), stats.chi2.cdf(stat, dof))
    one_segment = np.stack([(seg == s).mean(1) for s in range(k)], 1).max(1) > 0.7
    return p, float(one_segment.mean())


@pytest.mark.parametrize("strategy", ["balanced_labels", "natural"])
def test_pooled_batches_mix_segments_like_iid_draws(pool_dir, strategy):
    from mammodg.sampling.streams import _stream

    counts = np.array(list(POOL.values()), float)  # (segment, label)
    strata = {None: counts.sum(1)} if strategy == "natural" else {lab: counts[:, lab] for lab in (0, 1)}
    plan = make_plan(load_index(pool_dir), pool_dir, "train", strategy, seed=5)
    seg, lab, _ = _segments_labels(serialized_stream(plan, seed=5, shuffle_budget=64), 300)
    p, one_segment = _composition_test(seg, lab, strata)
    # i.i.d. draws: a batch > 70% one segment has probability < 1e-3 here (largest share 0.42)
    assert p > 1e-3 and one_segment < 0.02, (p, one_segment)
    # the test has the power to see blocked batches: the pool's shards read one after another (as each
    # (segment, label) stream reads its shards, and as pooled streams did) fail it
    if strategy == "natural":
        blocked = _stream(plan.files[0], plan.counts[0], 64, seed=5)
        seg, lab, _ = _segments_labels(blocked, 300)
        p, one_segment = _composition_test(seg, lab, strata)
        assert p < 1e-6 and one_segment > 0.1, (p, one_segment)


def test_pooled_passes_deterministic_and_resume(pool_dir):
    n = sum(sum(c) for c in POOL.values())
    plan = make_plan(load_index(pool_dir), pool_dir, "train", "natural", seed=2)
    _, _, ids = _segments_labels(serialized_stream(plan, seed=2, shuffle_budget=64), 2 * n // 32 + 1)
    ids = ids.ravel()
    assert sorted(ids[:n]) == sorted(ids[n:2 * n]) == list(range(n))  # each pass sees every record once
    assert (ids[:n] != ids[n:2 * n]).any()  # ... in a new order
    _, _, again = _segments_labels(serialized_stream(plan, seed=2, shuffle_budget=64), 10)
    np.testing.assert_array_equal(again.ravel(), ids[:320])  # same seed, same order
    _, _, other = _segments_labels(serialized_stream(plan, seed=3, shuffle_budget=64), 10)
    assert (other.ravel() != ids[:320]).any()
    tf.random.set_seed(0)  # a global seed, as the trainer sets (keras.utils.set_random_seed; 0 is a special case)
    try:
        seeded = [_segments_labels(serialized_stream(plan, seed=2, shuffle_budget=64), n // 32 + 1)[2].ravel()
                  for _ in range(2)]
    finally:
        tf.random.set_seed(None)
    np.testing.assert_array_equal(seeded[0], seeded[1])
    assert sorted(seeded[0][:n]) == list(range(n))

    plan = make_plan(load_index(pool_dir), pool_dir, "train", "balanced_labels", seed=2)
    _, lab, _ = _segments_labels(serialized_stream(plan, seed=2), 2)
    _, resumed, _ = _segments_labels(serialized_stream(plan, seed=2, start=13), 1)
    np.testing.assert_array_equal(resumed.ravel(), lab.ravel()[13:45])  # the label alternation continues
