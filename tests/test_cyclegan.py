"""CycleGAN style transfer (MSVCL v2 section III-B1 / IV-B): networks, training step, image pool, the stage."""
from __future__ import annotations

import json
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from mammodg import models
from mammodg.cli import main
from mammodg.augment.gan import breast_crop, style_batches, style_files, to_unit_range
from mammodg.models.cyclegan import CycleGAN, ImagePool, LinearDecay, patchgan_discriminator, pool_query, resnet_generator
from mammodg.preprocess.stored import from_stored, to_stored
from mammodg.records.styles import StyleTransfer

TINY = ["cyclegan.crop_size=32", "cyclegan.generator_filters=4", "cyclegan.generator_blocks=2",
        "cyclegan.discriminator_filters=4", "cyclegan.pool_size=4", "cyclegan.identity_weight=0", "batch_size=2"]
A, B = "PHANTOM|VendorA", "PHANTOM|VendorB"


def _tiny_gan(seed=3, identity_weight=0.0):
    return CycleGAN(crop_size=32, generator_filters=4, generator_blocks=2, discriminator_filters=4, pool_size=4,
                    identity_weight=identity_weight, seed=seed)


def _smooth(shape, seed):
    """Smooth random images in [-1, 1] (something a generator can learn to reconstruct)."""
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    x = tf.nn.avg_pool2d(x, 5, 1, "SAME").numpy()
    return np.tanh(3 * x)


def test_generator_keeps_any_multiple_of_4_shape():
    g = models.build("cyclegan_generator", filters=4, n_blocks=2)
    for shape in [(1, 64, 48, 1), (2, 32, 40, 1), (1, 8, 12, 1)]:
        y = keras.ops.convert_to_numpy(g(np.zeros(shape, np.float32)))
        assert y.shape == shape and np.all(np.abs(y) <= 1)


def test_default_generator_is_the_paper_resnet_9_blocks():
    g = resnet_generator()
    assert models.get("cyclegan_generator") is resnet_generator
    assert models.get("patchgan_discriminator") is patchgan_discriminator
    adds = [l for l in g.layers if isinstance(l, keras.layers.Add)]
    assert len(adds) == 9
    convs = [l for l in g.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    # c7s1-64, d128, d256, 9 x 2 x R256, u128, u64, c7s1-1
    assert [c.filters for c in convs] == [64, 128, 256] + [256] * 18 + [128, 64, 1]
    assert [c.kernel_size[0] for c in convs][:1] + [convs[-1].kernel_size[0]] == [7, 7]
    norms = [l for l in g.layers if isinstance(l, keras.layers.GroupNormalization)]
    assert len(norms) == 3 + 18 + 2 and all(l.groups in (-1, l.input.shape[-1]) for l in norms)  # instance norm


def test_patchgan_receptive_field_is_70():
    d = patchgan_discriminator(filters=4)
    assert d(np.zeros((1, 256, 256, 1), np.float32)).shape == (1, 30, 30, 1)  # the reference 30x30 patch map
    # Instance norm statistics couple all pixels; the receptive field is that of the conv geometry alone.
    geom = keras.models.clone_model(
        d, clone_function=lambda l: keras.layers.Identity() if isinstance(l, keras.layers.GroupNormalization)
        else l.__class__.from_config(l.get_config()))
    x = tf.constant(np.random.default_rng(0).normal(size=(1, 128, 128, 1)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = geom(x)[0, 7, 7, 0]
    grad = tape.gradient(out, x).numpy()[0, ..., 0]
    rows, cols = np.nonzero(np.any(grad != 0, axis=1))[0], np.nonzero(np.any(grad != 0, axis=0))[0]
    assert rows.max() - rows.min() + 1 == 70 and cols.max() - cols.min() + 1 == 70


def test_train_step_lowers_cycle_loss_and_seed_fixes_init():
    keras.utils.set_random_seed(3)
    gan = _tiny_gan()
    keras.utils.set_random_seed(3)
    other = _tiny_gan()
    assert all(np.array_equal(a, b) for a, b in zip(gan.g_ab.get_weights(), other.g_ab.get_weights()))
    gan.compile(keras.optimizers.Adam(LinearDecay(2e-4, 100, 0.5), beta_1=0.5),
                keras.optimizers.Adam(LinearDecay(2e-4, 100, 0.5), beta_1=0.5))
    real_a, real_b = _smooth((2, 32, 32, 1), 0), -_smooth((2, 32, 32, 1), 1)
    before = float(gan.losses_of(real_a, real_b, training=False)[0]["cycle"])
    ds = tf.data.Dataset.from_tensors((real_a, real_b)).repeat()
    logs = gan.fit(ds, steps_per_epoch=8, epochs=1, verbose=0, shuffle=False).history
    after = float(gan.losses_of(real_a, real_b, training=False)[0]["cycle"])
    assert after < 0.9 * before, (before, after)
    assert int(gan.optimizer.iterations) == 8 and int(gan.d_optimizer.iterations) == 8
    assert set(logs) == {"loss", "g_total", "g_adv", "cycle", "identity", "d_a", "d_b"}
    assert int(gan.pool_a.count.numpy()) == 4 and int(gan.pool_b.count.numpy()) == 4  # 16 fakes seen, pool of 4


def test_gan_losses_match_the_numpy_formulas_inside_the_model():
    """The generator objective of losses_of, written out in numpy from the same networks' outputs."""
    from mammodg.losses import l1_loss, lsgan_generator_loss

    gan = _tiny_gan(identity_weight=2.5)
    a, b = _smooth((2, 32, 32, 1), 4), _smooth((2, 32, 32, 1), 5)
    got = {k: float(v) for k, v in gan.losses_of(a, b, training=False)[0].items()}
    run = lambda m, x: keras.ops.convert_to_numpy(m(x, training=False))  # noqa: E731
    fb, fa = run(gan.g_ab, a), run(gan.g_ba, b)
    adv = np.mean((run(gan.d_b, fb) - 1) ** 2) + np.mean((run(gan.d_a, fa) - 1) ** 2)
    cycle = np.mean(np.abs(run(gan.g_ba, fb) - a)) + np.mean(np.abs(run(gan.g_ab, fa) - b))
    ident = np.mean(np.abs(run(gan.g_ab, b) - b)) + np.mean(np.abs(run(gan.g_ba, a) - a))
    np.testing.assert_allclose([got["g_adv"], got["cycle"], got["identity"], got["g_total"]],
                               [adv, cycle, ident, adv + 10 * cycle + 2.5 * ident], rtol=1e-4)
    assert float(lsgan_generator_loss(np.ones((2, 3)))) == 0 and float(l1_loss(a, a)) == 0


def _numpy_pool(size, images_batches, uniforms, slots):
    """The pool rule written plainly: fill, then with probability 1/2 swap with a random stored image."""
    stored, out = [], []
    k = 0
    for batch in images_batches:
        for image in batch:
            if len(stored) < size:
                stored.append(image)
                out.append(image)
            elif uniforms[k] < 0.5:
                out.append(stored[slots[k]])
                stored[slots[k]] = image
            else:
                out.append(image)
            k += 1
    return np.stack(out), np.stack(stored)


def test_pool_query_equals_the_numpy_rule_for_the_same_draws():
    rng = np.random.default_rng(0)
    size, batches = 5, [rng.normal(size=(3, 2, 2, 1)).astype(np.float32) for _ in range(8)]
    uniforms, slots = rng.uniform(size=24).astype(np.float32), rng.integers(0, size, 24).astype(np.int32)
    buffer, count, out = np.zeros((size, 2, 2, 1), np.float32), np.int32(0), []
    step = tf.function(pool_query)  # also as traced inside train_step
    for i, batch in enumerate(batches):
        o, buffer, count = step(buffer, count, batch, uniforms[3 * i:3 * i + 3], slots[3 * i:3 * i + 3])
        out.append(o.numpy())
    want_out, want_stored = _numpy_pool(size, batches, uniforms, slots)
    np.testing.assert_array_equal(np.concatenate(out), want_out)
    np.testing.assert_array_equal(buffer.numpy(), want_stored)
    assert int(count) == size


def test_image_pool_fills_then_swaps_half_of_past_images_deterministically():
    assert ImagePool(0, (2, 2, 1))(np.ones((3, 2, 2, 1), np.float32)).shape == (3, 2, 2, 1)
    first = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
    queries = np.arange(100, 500, dtype=np.float32).reshape(400, 1, 1, 1)
    outs = []
    for seed in (0, 0, 1):
        pool = ImagePool(4, (1, 1, 1), seed=seed)
        np.testing.assert_array_equal(pool(first), first)  # filling: the query itself
        outs.append(np.concatenate([pool(queries[i:i + 2]) for i in range(0, 400, 2)])[:, 0, 0, 0])
    swapped = outs[0] != queries[:, 0, 0, 0]
    assert 0.4 < swapped.mean() < 0.6
    assert np.all(outs[0][swapped] < queries[swapped, 0, 0, 0])  # past images only
    assert len(set(outs[0][swapped])) == swapped.sum()  # each past image is handed back once
    np.testing.assert_array_equal(outs[0], outs[1])  # same seed, same choices
    assert not np.array_equal(outs[0], outs[2])
    assert int(pool.count.numpy()) == 4


def test_linear_decay_schedule():
    lr = LinearDecay(2e-4, steps=100, decay_start=0.5)
    values = [float(lr(s)) for s in (0, 50, 75, 100, 120)]
    np.testing.assert_allclose(values, [2e-4, 2e-4, 1e-4, 0, 0], atol=1e-9)
    assert LinearDecay.from_config(lr.get_config()).get_config() == lr.get_config()


def test_breast_crop_contains_breast_and_pads_small_images_eagerly_and_in_map():
    stored = np.zeros((20, 16, 1), np.uint16)
    stored[2:6, 1:5] = 30000  # a small breast region in a corner
    mapped = tf.data.Dataset.range(5).map(lambda i: breast_crop(tf.constant(stored), 24, tf.stack([tf.constant(0, tf.int64), i])))
    for i, in_map in enumerate(mapped):
        crop = breast_crop(tf.constant(stored), 24, tf.constant([0, i], tf.int64)).numpy()
        assert crop.shape == (24, 24, 1) and np.any(crop > -1) and crop.min() == -1
        assert np.allclose(crop[crop > -1], (30000 - 1) / 65534 * 2 - 1)
        np.testing.assert_array_equal(in_map.numpy(), crop)


def test_to_unit_range_matches_numpy_eagerly_and_in_map():
    stored = np.array([[0, 1, 32768, 65535]], np.uint16)[..., None]
    want = np.where(stored > 0, (stored.astype(np.float64) - 1) / 65534 * 2 - 1, -1)
    img, mask = to_unit_range(tf.constant(stored))
    np.testing.assert_allclose(img.numpy(), want, atol=1e-6)
    np.testing.assert_array_equal(mask.numpy(), stored > 0)
    mapped = next(iter(tf.data.Dataset.from_tensors(stored).map(lambda s: to_unit_range(s)[0])))
    np.testing.assert_allclose(mapped.numpy(), want, atol=1e-6)


def test_style_batches_of_one_style(tiny_records):
    from mammodg.records.reader import load_index

    files, count = style_files(load_index(tiny_records), tiny_records, "train", A)
    assert files and count > 0
    take = lambda seed: [b.numpy() for b in style_batches(files, count, batch_size=3, crop_size=32, seed=seed).take(3)]  # noqa: E731
    first, again, other = take(5), take(5), take(6)
    assert all(b.shape == (3, 32, 32, 1) and b.min() >= -1 and b.max() <= 1 and b.max() > -1 for b in first)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))


def _stage_args(tiny_records, run, steps, val_every=2, extra=()):
    sets = [f"data_dir={tiny_records}", f"run_dir={run}", f"steps={steps}", f"val_every={val_every}",
            f"cyclegan.styles=[{A}, {B}]", *TINY, *extra]
    return ["train", "--stage", "cyclegan", *[a for s in sets for a in ("--set", s)]]


def test_nan_loss_names_pair_and_step(tiny_records, tmp_path, monkeypatch, capsys):
    losses_of = CycleGAN.losses_of

    def nan_losses(self, real_a, real_b, training=True):
        g, fakes = losses_of(self, real_a, real_b, training)
        return {k: v * float("nan") for k, v in g.items()}, fakes

    monkeypatch.setattr(CycleGAN, "losses_of", nan_losses)
    assert main(_stage_args(tiny_records, tmp_path / "run", 4)) == 1  # the CLI: stopped, one line
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"^mammodg train: stopped: cyclegan pair PHANTOM\|VendorA <-> PHANTOM\|VendorB.*step 1; "
                     r"last good checkpoint: none", last), last


def test_unknown_style_is_a_clear_error(tiny_records, tmp_path, capsys):
    rc = main(["train", "--stage", "cyclegan", "--set", f"data_dir={tiny_records}", "--set", f"run_dir={tmp_path}",
               "--set", f"cyclegan.styles=[{A}, Nowhere|Vendor]"])
    err = capsys.readouterr().err
    assert rc == 2 and "cyclegan.styles" in err and "Nowhere|Vendor" in err and B in err


def test_stage_end_to_end_resume_and_transfer(tiny_records, tmp_path, capsys):
    run = tmp_path / "run"
    cfg_path = tmp_path / "cyclegan.yaml"
    cfg_path.write_text(f"stage: cyclegan\ndata_dir: {tiny_records}\nrun_dir: {run}\nval_every: 2\n"
                        f"cyclegan:\n  styles: ['{A}', '{B}']\n")

    def train(steps):
        rc = main(["train", "--stage", "cyclegan", "--config", str(cfg_path), "--set", f"steps={steps}",
                   *[a for s in TINY for a in ("--set", s)]])
        assert rc == 0
        return capsys.readouterr().out

    out = train(2)
    assert "step 2/2" in out and "steps/s" in out
    pair = run / "pair_PHANTOM_VendorA__PHANTOM_VendorB"
    hist = json.loads((pair / "history.json").read_text())
    assert {"g_adv", "cycle", "identity", "d_a", "d_b"} <= set(hist[0]["train"]) and hist[0]["global"]["cycle"] > 0
    assert list((pair / "tensorboard").iterdir())
    out = train(4)  # more steps: resumes the finished pair from its checkpoint
    assert f"resuming {pair} from step 2" in out and "step 4/4" in out
    info = json.loads((run / "styles.json").read_text())
    assert info["styles"] == [A, B] and info["pairs"] == [[A, B]]
    assert {(g["src"], g["dst"]) for g in info["generators"]} == {(A, B), (B, A)}
    keras_file = run / info["generators"][0]["keras"]
    mtime = keras_file.stat().st_mtime_ns
    out = train(4)  # same command again: nothing to train
    assert "already trained to step 4" in out and keras_file.stat().st_mtime_ns == mtime
    saved = (run / "config.yaml").read_text()
    rc = main(["train", "--stage", "cyclegan", "--config", str(cfg_path), "--set", "steps=6",
               *[a for s in TINY + ["cyclegan.cycle_weight=5"] for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert rc == 2 and "cyclegan.cycle_weight differ" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == saved and keras_file.stat().st_mtime_ns == mtime
    assert (run / "style_grid.png").stat().st_size > 5000

    x = _smooth((1, 64, 48, 1), 2)
    st = StyleTransfer.load(run)
    assert st.styles == [A, B]
    images = (x[:, :62, :46] + 1) / 2  # sides not multiples of 4
    masks = images > 0.3
    # the exported SavedModel (export contract: stored uint16 in) equals the Keras generator's transfer
    g0 = info["generators"][0]
    saved = tf.saved_model.load(str(run / g0["saved_model"]))  # keep a reference while serving
    stored = to_stored(images[0, ..., 0], masks[0, ..., 0])[None, ..., None]
    served = saved.signatures["serve_images"](images=tf.constant(stored))["styled_image_float"].numpy()
    unit, mask = from_stored(stored)
    want = st.transfer(unit, mask, g0["src"], g0["dst"])
    np.testing.assert_allclose(served, want, atol=1e-5)
    y = st.transfer(np.repeat(images, 3, 0), np.repeat(masks, 3, 0), A, B)
    assert y.shape == (3, 62, 46, 1) and y.dtype == np.float32
    assert y.min() >= 0 and y.max() <= 1 and np.all(y[~np.repeat(masks, 3, 0)] == 0)
    np.testing.assert_allclose(y[0], y[2], atol=1e-6)
    assert st.transfer(images, masks, B, B) is not None and np.array_equal(st.transfer(images, masks, B, B), images)
    with pytest.raises(ValueError, match="unknown style"):
        st.transfer(images, masks, A, "PHANTOM|VendorC")


def test_killed_cyclegan_run_resumes(tiny_records, tmp_path, capsys):
    """Killed (SIGKILL) after a checkpoint, the pair resumes from it through the shared trainer: both
    optimizers and the image pools come back from last.keras, and the history continues."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    args = _stage_args(tiny_records, run, 12)
    pair = run / "pair_PHANTOM_VendorA__PHANTOM_VendorB"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mammodg.cli", *args], stdout=log, stderr=subprocess.STDOUT)
    state = pair / "state.json"
    deadline = time.time() + 1200  # generous: CI machines may be slow or shared
    while time.time() < deadline and proc.poll() is None and not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.is_file(), "no checkpoint before the deadline:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = json.loads(state.read_text())["step"]
    assert 2 <= killed_at < 12 and killed_at % 2 == 0
    gan = keras.models.load_model(pair / "last.keras")
    assert int(gan.optimizer.iterations) == killed_at and int(gan.d_optimizer.iterations) == killed_at
    assert int(gan.pool_a.count.numpy()) == min(4, 2 * killed_at)  # pool of 4, batch of 2 fakes per step
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"resuming {pair} from step {killed_at}" in out
    assert [h["step"] for h in json.loads((pair / "history.json").read_text())] == list(range(2, 14, 2))
    assert json.loads(state.read_text())["done"] is True and (run / "styles.json").is_file()
    assert main(args) == 0 and "already trained to step 12" in capsys.readouterr().out


def test_non_chief_worker_writes_nothing_into_the_run_folder(tiny_records, tmp_path, monkeypatch):
    """Multi-worker CycleGAN: a worker that is not the chief trains but leaves generators, styles.json, the
    style grid and the SavedModels to the chief (the run folder is shared)."""
    import mammodg.stages.cyclegan as stage

    monkeypatch.setattr(stage, "cluster", lambda: (2, 1, False))
    run = tmp_path / "run"
    assert main(_stage_args(tiny_records, run, 2)) == 0
    assert not (run / "generators").exists() and not (run / "styles.json").exists()
    assert not (run / "style_grid.png").exists() and not (run / "saved_model").exists()
