"""mammodg.preprocess.stored: the stored 16-bit encoding, its numpy and TensorFlow forms agree exactly."""
import numpy as np
import tensorflow as tf

from mammodg.preprocess.stored import STORED_MAX, from_stored, to_stored, to_stored_tf, unit_values_tf


def test_encoding_by_hand():
    v = np.array([0.0, 1.0, 0.5, -0.2, 1.7, 0.3], np.float32)
    mask = np.array([True, True, True, True, True, False])
    # 0 -> 1, 1 -> 65535, 0.5 -> 1 + round(32767.0) (exact), clipped below and above, 0 outside the mask
    np.testing.assert_array_equal(to_stored(v, mask), [1, STORED_MAX, 32768, 1, STORED_MAX, 0])
    values, inside = from_stored(np.array([0, 1, 32768, STORED_MAX], np.uint16))
    np.testing.assert_array_equal(inside, [False, True, True, True])
    np.testing.assert_allclose(values, [0.0, 0.0, 32767 / 65534, 1.0], rtol=0, atol=1e-7)


def test_tf_forms_match_numpy_on_every_level_and_at_rounding_ties():
    stored = np.arange(STORED_MAX + 1, dtype=np.uint16)
    values, mask = from_stored(stored)
    np.testing.assert_array_equal(unit_values_tf(tf.constant(stored)).numpy(), values)
    np.testing.assert_array_equal(unit_values_tf(tf.constant(stored), fill=-3.0).numpy()[0], -3.0)
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.uniform(-0.1, 1.1, 5000), (np.arange(2000) + 0.5) / 65534]).astype(np.float32)
    m = rng.random(v.shape) < 0.9
    np.testing.assert_array_equal(to_stored_tf(tf.constant(v), tf.constant(m)).numpy(), to_stored(v, m))
    np.testing.assert_array_equal(to_stored(values, mask), stored)  # the round trip is exact
