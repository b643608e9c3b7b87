"""label_fraction: whole patients, deterministic, order-free, nested, binomially on target; the tf.data
filter on serialized records keeps the same patients as the Python list path."""
import random
import subprocess
import sys

import numpy as np
import pytest

from mammodg.records.split import pseudonym
from mammodg.sampling.label_fraction import kept_patients, record_filter, subsample

FRACTIONS = (0.05, 0.1, 0.2, 0.5, 1.0)


def _items(n_patients=400, seed=0):
    """(pseudonym, (record number, label)) with 1..4 records per patient, patient label shared."""
    rng = random.Random(seed)
    items = []
    for i in range(n_patients):
        p = pseudonym("test-salt", "SRC", f"P{i:05d}")
        lab = int(rng.random() < 0.3)
        items += [(p, (len(items), lab)) for _ in range(rng.randint(1, 4))]
    return items


def test_whole_patients_order_free_nested():
    items = _items()
    previous = set()
    for f in FRACTIONS:
        kept, summary = subsample(items, f, label=lambda r: r[1][1])
        kept_p = {p for p, _ in kept}
        for p in {p for p, _ in items}:  # a patient is wholly kept or wholly dropped
            n_all = sum(q == p for q, _ in items)
            assert sum(q == p for q, _ in kept) in ((0, n_all) if p in kept_p else (0,))
            assert (p in kept_p) == any(q == p for q, _ in kept)
        assert [r for r in items if r[0] in kept_p] == kept  # input order kept
        shuffled = items[:]
        random.Random(7).shuffle(shuffled)
        assert {p for p, _ in subsample(shuffled, f)[0]} == kept_p  # independent of record order
        assert previous <= kept_p  # nested
        previous = kept_p
        assert summary["kept_patients"] == len(kept_p) and summary["patients"] == 400
        assert sum(summary["kept_by_label"].values()) == len(kept_p)
    assert len(previous) == 400  # fraction 1.0 keeps everyone


def test_kept_fraction_is_binomial_around_target():
    pats = [pseudonym("s2", "SRC", f"Q{i}") for i in range(4000)]
    for f in (0.05, 0.1, 0.2, 0.5):
        k = len(kept_patients(pats, f))
        sd = np.sqrt(len(pats) * f * (1 - f))
        assert abs(k - len(pats) * f) <= 4 * sd, (f, k)
    a, b = kept_patients(pats, 0.5, salt="one"), kept_patients(pats, 0.5, salt="two")
    assert a != b and 0.3 < len(a & b) / len(a) < 0.7  # another salt draws another, unrelated subset


def test_deterministic_in_a_fresh_process():
    pats = sorted({p for p, _ in _items(200)})
    here = sorted(kept_patients(pats, 0.2))
    code = ("import sys, json; from mammodg.sampling.label_fraction import kept_patients; "
            "print('RESULT', json.dumps(sorted(kept_patients(json.loads(sys.stdin.read()), 0.2))))")
    import json

    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(pats), capture_output=True, text=True, timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stderr[-2000:]
    assert json.loads(line[0][len("RESULT "):]) == here and 0 < len(here) < len(pats)


def test_tf_data_filter_matches_list_path():
    import tensorflow as tf

    from mammodg.records.schema import encode_example

    items = _items(60, seed=3)
    raw = [encode_example({"patient": p, "label": r[1]}) for p, r in items]
    ds = tf.data.Dataset.from_tensor_slices(raw).filter(record_filter(0.3))
    got = [bytes(x.numpy()) for x in ds]
    kept, _ = subsample(list(zip([p for p, _ in items], raw)), 0.3)
    assert got == [r for _, r in kept] and 0 < len(got) < len(raw)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_rejects_fraction_outside_0_1(bad):
    with pytest.raises(ValueError, match="label_fraction"):
        kept_patients(["a"], bad)
