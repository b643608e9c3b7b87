"""Algorithm 1: the fast sampling pattern equals the slot-by-slot reference; proportions are exact."""
import numpy as np
import pytest

from mammodg.sampling.pattern import sampling_pattern, sampling_pattern_reference


def test_paper_figure2_example():
    s = sampling_pattern([2, 5, 10, 20])
    assert len(s) == 37
    assert np.bincount(s).tolist() == [2, 5, 10, 20]
    np.testing.assert_array_equal(s, sampling_pattern_reference([2, 5, 10, 20]))
    # segment 0 (2 samples) sits at the start and half-way, as floor(j * 37 / 2) = 0, 18
    assert np.flatnonzero(s == 0).tolist() == [0, 18]


def test_fast_equals_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(400):
        m = int(rng.integers(1, 15))
        n = rng.integers(1, int(rng.integers(2, 120)), m)
        np.testing.assert_array_equal(sampling_pattern(n), sampling_pattern_reference(n), err_msg=str(n.tolist()))


def test_wrap_around_and_ties():
    for n in ([1, 1, 1], [3, 3], [1, 64, 1, 63], [5, 1, 5, 1, 5], [64], [65, 64, 1]):
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
