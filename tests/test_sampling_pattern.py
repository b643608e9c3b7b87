"""Algorithm 1: the fast sampling pattern equals the slot-by-slot reference; proportions are exact."""
import numpy as np
import pytest

from mammodg.sampling import pattern
from mammodg.sampling.pattern import sampling_pattern, sampling_pattern_reference


def test_paper_figure2_example():
    s = sampling_pattern([2, 5, 10, 20])
    assert len(s) == 37
    assert np.bincount(s).tolist() == [2, 5, 10, 20]
    np.testing.assert_array_equal(s, sampling_pattern_reference([2, 5, 10, 20]))
    # segment 0 (2 samples) sits at the start and half-way, as floor(j * 37 / 2) = 0, 18
    assert np.flatnonzero(s == 0).tolist() == [0, 18]


def _random_counts(rng):
    """Counts of a random shape: any sizes; many equal sizes (all their samples want the same slots);
    or one large segment among small ones (long pile-ups that wrap past the end)."""
    m = int(rng.integers(1, 40))
    kind = rng.integers(0, 3)
    if kind == 0:
        return rng.integers(1, int(rng.integers(2, 400)), m)
    if kind == 1:
        return np.full(m, int(rng.integers(1, 60))) + rng.integers(0, 2, m) * int(rng.integers(0, 3))
    n = rng.integers(1, 8, m)
    n[rng.integers(0, m)] = int(rng.integers(50, 2000))
    return n


# _DENSE = 0: every segment on the bitset (pile-ups that need many rounds and wraps fall back to ranks
# on the free slots); 32: the default switch; 10**9: every segment on the sorted free slots
@pytest.mark.parametrize("dense", [0, 32, 10**9])
def test_fast_equals_reference_on_random_inputs(dense, monkeypatch):
    monkeypatch.setattr(pattern, "_DENSE", dense)
    rng = np.random.default_rng(dense)
    for _ in range(300):
        n = _random_counts(rng)
        np.testing.assert_array_equal(sampling_pattern(n), sampling_pattern_reference(n), err_msg=str(n.tolist()))


def test_fast_equals_reference_many_segments():
    """Hundreds of segments: both phases, and the pile-up at slot 0 (every segment's first slot)
    outgrowing the spacing of later segments."""
    rng = np.random.default_rng(7)
    for size in (300, 1000):
        n = rng.integers(1, size, 150)
        np.testing.assert_array_equal(sampling_pattern(n), sampling_pattern_reference(n))


def test_wrap_around_and_ties():
    for n in ([1, 1, 1], [3, 3], [1, 64, 1, 63], [5, 1, 5, 1, 5], [64], [65, 64, 1], [1, 5000], [7] * 50,
              [1, 2, 4, 8, 16, 32, 64, 128, 256], [63, 64, 65, 127, 128, 129]):
        np.testing.assert_array_equal(sampling_pattern(n), sampling_pattern_reference(n))


def test_even_spacing_and_periods():
    n = np.array([3, 7, 50, 200])
    s = sampling_pattern(n)
    for i, ni in enumerate(n):
        gaps = np.diff(np.flatnonzero(np.tile(s, 2) == i))
        period = len(s) / ni
        assert gaps.max() <= np.ceil(period) + 2 and gaps.min() >= 1
    periods = np.tile(s, 5)  # any whole number of periods has the exact shares n_i / N_min
    np.testing.assert_array_equal(np.bincount(periods), 5 * n)


@pytest.mark.parametrize("bad", [[2, 0, 3], [], [1.5, 2], [-1, 2]])
def test_bad_counts_rejected(bad):
    with pytest.raises(ValueError):
        sampling_pattern(bad)


def test_zero_segment_named():
    with pytest.raises(ValueError, match=r"\[1\]"):
        sampling_pattern([4, 0])
