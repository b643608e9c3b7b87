"""NT-Xent (MSVCL v2 eq. 1) against a direct numpy evaluation; cross-replica equals one device."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mammodg.losses import NTXent, nt_xent


def _numpy_nt_xent(z1, z2, tau):
    """Eq. (1) written out: 2N samples, l(i, j) summed over every ordered positive pair, / 2N."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        den = sum(np.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        total += -np.log(np.exp(z[i] @ z[j] / tau) / den)
    return total / n2


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (8, 16, 0.1), (5, 128, 0.07)])
def test_nt_xent_equals_numpy_eq1(n, d, tau):
    rng = np.random.default_rng(n * d)
    for _ in range(3):
        z1, z2 = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
        got = float(nt_xent(z1, z2, tau))
        assert got == pytest.approx(_numpy_nt_xent(z1, z2, tau), abs=1e-5)
        assert float(nt_xent(z2, z1, tau)) == pytest.approx(got, abs=1e-5)  # symmetric


def test_nt_xent_falls_as_positives_align():
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(16, 32)).astype(np.float32)
    noise = rng.normal(size=z1.shape).astype(np.float32)
    losses = [float(nt_xent(z1, z1 + s * noise, 0.1)) for s in (4.0, 1.0, 0.3, 0.0)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    # scale invariance: cosine similarity
    assert float(nt_xent(3 * z1, z1 + noise, 0.1)) == pytest.approx(float(nt_xent(z1, z1 + noise, 0.1)), abs=1e-5)


def test_keras_loss_matches_function():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(6, 2, 8)).astype(np.float32)
    loss = NTXent(temperature=0.2)
    assert float(loss(np.zeros(6), z)) == pytest.approx(float(nt_xent(z[:, 0], z[:, 1], 0.2)), abs=1e-5)


def test_keras_loss_with_several_positive_pairs_is_their_mean():
    """MSVCL: (anchor, multi-style) and (anchor, multi-view) pairs of 3 views, each eq. (1) written out."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5, 3, 8)).astype(np.float32)
    loss = NTXent(temperature=0.3, pairs=((0, 1), (0, 2)))
    ref = (_numpy_nt_xent(z[:, 0], z[:, 1], 0.3) + _numpy_nt_xent(z[:, 0], z[:, 2], 0.3)) / 2
    assert float(loss(np.zeros(5), z)) == pytest.approx(ref, abs=1e-5)
    restored = NTXent.from_config(loss.get_config())
    assert restored.pairs == ((0, 1), (0, 2)) and float(restored(np.zeros(5), z)) == pytest.approx(ref, abs=1e-5)


def test_two_replicas_equal_one_device_on_the_global_batch():
    """Loss and gradients under MirroredStrategy on 2 logical CPUs equal the single-device values."""
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from mammodg.losses import NTXent, nt_xent
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 2, 5)).astype(np.float32)
        w0 = rng.normal(size=(5, 4)).astype(np.float32)
        loss = NTXent(temperature=0.3)
        def value_and_grad(w, xb):
            with tf.GradientTape() as tape:
                z = tf.einsum("bvd,de->bve", xb, w)
                l = loss(tf.zeros(tf.shape(xb)[0]), z)
            return l, tape.gradient(l, w)
        w = tf.Variable(w0)
        single, g_single = value_and_grad(w, tf.constant(x))
        ref = float(nt_xent(x[:, 0] @ w0, x[:, 1] @ w0, 0.3))
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            wm = tf.Variable(w0)
        ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(x).batch(8))
        batch = next(iter(ds))
        per_replica = strategy.run(lambda xb: value_and_grad(wm, xb), args=(batch,))
        total = strategy.reduce("SUM", per_replica[0], axis=None)
        grad = strategy.reduce("SUM", per_replica[1], axis=None)
        n_rep = strategy.num_replicas_in_sync
        print("RESULT", n_rep, float(single), float(total), ref, float(np.abs(grad - g_single).max()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    n_rep, single, total, ref, grad_diff = line[0].split()[1:]
    assert int(n_rep) == 2
    assert float(single) == pytest.approx(float(ref), abs=1e-5)
    assert float(total) == pytest.approx(float(single), abs=1e-5)
    assert float(grad_diff) < 1e-5


# ------------------------------------------------------------------------------------ CycleGAN losses
def test_lsgan_and_l1_losses_equal_their_numpy_formulas():
    from mammodg.losses import l1_loss, lsgan_discriminator_loss, lsgan_generator_loss

    rng = np.random.default_rng(7)
    for shape in [(2, 3, 3, 1), (1, 30, 30, 1), (4, 5)]:
        real, fake = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
        r64, f64 = real.astype(np.float64), fake.astype(np.float64)
        assert float(lsgan_generator_loss(fake)) == pytest.approx(np.mean((f64 - 1) ** 2), rel=1e-5)
        want_d = 0.5 * (np.mean((r64 - 1) ** 2) + np.mean(f64 ** 2))
        assert float(lsgan_discriminator_loss(real, fake)) == pytest.approx(want_d, rel=1e-5)
        assert float(l1_loss(real, fake)) == pytest.approx(np.mean(np.abs(r64 - f64)), rel=1e-5)
    # the optimum of each: fakes scored 1 for G; real 1 and fake 0 for D; equal images for L1
    ones, zeros = np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32)
    assert float(lsgan_generator_loss(ones)) == 0 and float(lsgan_discriminator_loss(ones, zeros)) == 0
    assert float(lsgan_discriminator_loss(zeros, ones)) == pytest.approx(1.0)
