"""NT-Xent (MSVCL v2 eq. 1), with and without patient groups, against a direct numpy evaluation; cross-replica
equals one device."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mammodg.losses import NTXent, nt_xent


def _numpy_nt_xent(z1, z2, tau, groups=None):
    """Eq. (1) written out: 2N samples, l(i, j) summed over every ordered positive pair, / 2N. With ``groups``
    the denominator drops every other sample of the anchor's group except its positive j."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    n = n2 // 2
    g = None if groups is None else np.concatenate([groups, groups])
    total = 0.0
    for i in range(n2):
        j = (i + n) % n2
        kept = [k for k in range(n2) if k != i and (k == j or g is None or g[k] != g[i])]
        den = sum(np.exp(z[i] @ z[k] / tau) for k in kept)
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
    """Loss and gradients under MirroredStrategy on 2 logical CPUs equal the single-device values: plain
    SimCLR pairs, and MSVCL's two pair terms with patient groups that span both replicas (ids from
    patient_group_id, fed as y_true)."""
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from mammodg.losses import NTXent, nt_xent
        from mammodg.records.pairs import patient_group_id
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 3, 5)).astype(np.float32)
        w0 = rng.normal(size=(5, 4)).astype(np.float32)
        # replica 0 gets rows 0-3, replica 1 rows 4-7: patients a and b have rows on both
        ids = patient_group_id(tf.constant(list("abcadbea"))).numpy()
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            wm = tf.Variable(w0)
        for name, pairs, groups, y in (("plain", ((0, 1),), False, np.zeros(8, np.float32)),
                                       ("groups", ((0, 1), (0, 2)), True, ids)):
            loss = NTXent(temperature=0.3, pairs=pairs, groups=groups)
            def value_and_grad(w, xb, yb):
                with tf.GradientTape() as tape:
                    z = tf.einsum("bvd,de->bve", xb, w)
                    l = loss(yb, z)
                return l, tape.gradient(l, w)
            single, g_single = value_and_grad(tf.Variable(w0), tf.constant(x), tf.constant(y))
            z = np.einsum("bvd,de->bve", x, w0)
            ref = np.mean([float(nt_xent(z[:, i], z[:, j], 0.3, ids if groups else None)) for i, j in pairs])
            ungrouped = np.mean([float(nt_xent(z[:, i], z[:, j], 0.3)) for i, j in pairs])
            ds = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
            xb, yb = next(iter(ds))
            per_replica = strategy.run(lambda xb, yb: value_and_grad(wm, xb, yb), args=(xb, yb))
            total = strategy.reduce("SUM", per_replica[0], axis=None)
            grad = strategy.reduce("SUM", per_replica[1], axis=None)
            print("RESULT", name, strategy.num_replicas_in_sync, float(single), float(total), ref, ungrouped,
                  float(np.abs(grad - g_single).max()))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = {ln.split()[1]: ln.split()[2:] for ln in out.stdout.splitlines() if ln.startswith("RESULT")}
    assert set(lines) == {"plain", "groups"}, out.stderr[-3000:]
    for name, (n_rep, single, total, ref, ungrouped, grad_diff) in lines.items():
        assert int(n_rep) == 2
        assert float(single) == pytest.approx(float(ref), abs=1e-5), name
        assert float(total) == pytest.approx(float(single), abs=1e-5), name
        assert float(grad_diff) < 1e-5, name
    assert abs(float(lines["groups"][3]) - float(lines["groups"][4])) > 1e-3  # the groups mask something


@pytest.mark.parametrize("groups", [[0, 0, 1, 2, 2, 2], [7, 3, 7, 3, 7, 3], [5, 5, 5, 5, 5, 5]])
def test_nt_xent_with_groups_equals_numpy_eq1_with_masked_entries_removed(groups):
    """Same-group samples leave the denominator; the positive stays although it shares the group."""
    rng = np.random.default_rng(sum(groups))
    z1, z2 = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    g = np.array(groups, dtype=np.int64)
    got = float(nt_xent(z1, z2, 0.2, g))
    ref = _numpy_nt_xent(z1, z2, 0.2, g)
    assert got == pytest.approx(ref, abs=1e-5)
    assert abs(ref - _numpy_nt_xent(z1, z2, 0.2)) > 1e-2  # the mask changes the loss: the test can fail
    assert float(nt_xent(z2, z1, 0.2, g)) == pytest.approx(got, abs=1e-5)
    if len(set(groups)) == 1:  # nothing but the positive is left: -log(1)
        assert got == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_with_distinct_groups_is_eq1_and_bad_length_is_refused():
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(size=(5, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    assert float(nt_xent(z1, z2, 0.1, np.arange(5) * 11)) == pytest.approx(float(nt_xent(z1, z2, 0.1)), abs=1e-6)
    with pytest.raises(ValueError, match="groups has 4 ids for 5 pairs"):
        nt_xent(z1, z2, 0.1, np.arange(4))


def test_keras_loss_takes_groups_from_y_true_in_every_pair():
    """MSVCL's two pair terms, each with the groups masked; ids near 2**24 survive Keras' float32 y_true,
    through model.evaluate as through a direct call; groups=False still ignores y_true."""
    import keras

    rng = np.random.default_rng(4)
    z = rng.normal(size=(6, 3, 8)).astype(np.float32)
    ids = np.array([2**24 - 1, 2**24 - 2, 2**24 - 1, 9, 2**24 - 2, 9], dtype=np.int64)
    ref = (_numpy_nt_xent(z[:, 0], z[:, 1], 0.3, ids) + _numpy_nt_xent(z[:, 0], z[:, 2], 0.3, ids)) / 2
    loss = NTXent(temperature=0.3, pairs=((0, 1), (0, 2)), groups=True)
    assert float(loss(ids, z)) == pytest.approx(ref, abs=1e-5)
    assert float(loss(ids[:, None], z)) == pytest.approx(ref, abs=1e-5)
    restored = NTXent.from_config(loss.get_config())
    assert restored.groups and float(restored(ids, z)) == pytest.approx(ref, abs=1e-5)
    model = keras.Sequential([keras.Input((3, 8)), keras.layers.Identity()])
    model.compile(loss=loss)
    assert model.evaluate(z, ids, batch_size=6, verbose=0) == pytest.approx(ref, abs=1e-5)
    plain = (_numpy_nt_xent(z[:, 0], z[:, 1], 0.3) + _numpy_nt_xent(z[:, 0], z[:, 2], 0.3)) / 2
    assert float(NTXent(temperature=0.3, pairs=((0, 1), (0, 2)))(ids, z)) == pytest.approx(plain, abs=1e-5)


def test_patient_group_id_from_a_parsed_pair_record():
    """The pair decoder's id: read from a serialized pair record's patient, equal for one pseudonym, distinct
    for others, below 2**24 and so exact in float32."""
    import tensorflow as tf

    from mammodg.records.pairs import GROUP_ID_BUCKETS, PAIR_FIELDS, parse_pair, patient_group_id
    from mammodg.records.schema import encode_example

    patients = [f"{i:016x}" for i in range(0, 200 * 7919, 7919)]
    raws = [encode_example({"patient": p, "laterality": lat}, PAIR_FIELDS) for p in patients for lat in "LR"]
    ds = tf.data.Dataset.from_tensor_slices(raws).map(lambda raw: patient_group_id(parse_pair(raw)["patient"]))
    ids = np.array(list(ds.as_numpy_iterator()))
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < GROUP_ID_BUCKETS == 2**24
    assert (ids[0::2] == ids[1::2]).all()  # both breasts of a patient: one group
    assert len(set(ids[0::2].tolist())) == len(patients)
    assert (ids.astype(np.float32).astype(np.int64) == ids).all()


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
