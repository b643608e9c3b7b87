"""The matching loss equals eq. (3) of MSVCL v2 evaluated directly with numpy."""
import numpy as np
import pytest

from mammodg.losses import max_margin_contrastive


def _numpy_eq3(f1, f2, y, m):
    """Eq. (3) written out term by term, in float64."""
    total = 0.0
    for a, b, yk in zip(f1.astype(np.float64), f2.astype(np.float64), y):
        d = np.sqrt(np.sum((a - b) ** 2))
        total += yk * d ** 2 + (1 - yk) * max(m - d, 0.0) ** 2
    return total / (2 * len(y))


@pytest.mark.parametrize("k,dim,margin,scale", [(1, 2, 10.0, 1.0), (6, 8, 10.0, 2.0), (9, 16, 5.0, 1.0), (4, 3, 15.0, 8.0)])
def test_equals_numpy_eq3(k, dim, margin, scale):
    rng = np.random.default_rng(k * dim)
    f1 = (rng.normal(size=(k, dim)) * scale).astype(np.float32)
    f2 = (rng.normal(size=(k, dim)) * scale).astype(np.float32)
    y = rng.integers(0, 2, k).astype(np.float32)
    got = float(max_margin_contrastive(f1, f2, y, margin=margin))
    assert got == pytest.approx(_numpy_eq3(f1, f2, y, margin), rel=1e-5, abs=1e-6)


def test_hand_values():
    """K = 2: a matched pair at distance 5 (25) and an unmatched one at 3 with m = 10 ((10-3)^2 = 49):
    (25 + 49) / (2 * 2) = 18.5; an unmatched pair beyond the margin costs nothing."""
    f1 = np.array([[0.0, 0.0], [0.0, 0.0]], np.float32)
    f2 = np.array([[3.0, 4.0], [0.0, 3.0]], np.float32)
    assert float(max_margin_contrastive(f1, f2, np.array([1, 0]))) == pytest.approx(18.5)
    assert float(max_margin_contrastive(f1[:1], np.array([[0.0, 12.0]], np.float32), np.array([0]))) == 0.0
    # identical embeddings: a matched pair costs 0, an unmatched one m^2 / 2 (with K = 1)
    assert float(max_margin_contrastive(f1[:1], f1[:1], np.array([1.0]))) == 0.0
    assert float(max_margin_contrastive(f1[:1], f1[:1], np.array([0.0]), margin=4.0)) == pytest.approx(8.0, rel=1e-5)
    assert float(max_margin_contrastive(np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32), np.zeros(0))) == 0.0


def test_gradient_finite_at_zero_distance():
    import tensorflow as tf

    f1 = tf.Variable(np.ones((3, 4), np.float32))
    with tf.GradientTape() as tape:
        loss = max_margin_contrastive(f1, tf.ones((3, 4)), tf.constant([1.0, 0.0, 1.0]))
    g = tape.gradient(loss, f1).numpy()
    assert np.all(np.isfinite(g))
