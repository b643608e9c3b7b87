"""CycleGAN style transfer (MSVCL v2 section III-B1 / IV-B): networks, training step, image pool, the stage."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mammodg import models
from mammodg.cli import main
from mammodg.config import CycleGANConfig, TrainConfig
from mammodg.models.cyclegan import patchgan_discriminator, resnet_generator
from mammodg.records.styles import StyleTransfer
from mammodg.stages.cyclegan import CycleGAN, ImagePool, breast_crop, linear_decay, train_pair
from mammodg.train import TrainingError

TINY = ["cyclegan.crop_size=32", "cyclegan.generator_filters=4", "cyclegan.generator_blocks=2",
        "cyclegan.discriminator_filters=4", "cyclegan.pool_size=4", "cyclegan.identity_weight=0", "batch_size=2"]
A, B = "PHANTOM|VendorA", "PHANTOM|VendorB"


def _tiny_cfg(**kw) -> TrainConfig:
    gan = CycleGANConfig(crop_size=32, generator_filters=4, generator_blocks=2, discriminator_filters=4, pool_size=4)
    return TrainConfig(stage="cyclegan", cyclegan=gan, **kw)


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
    cfg = _tiny_cfg(learning_rate=2e-4, steps=100)
    gan = CycleGAN(cfg, seed=3)
    other = CycleGAN(cfg, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(gan.g_ab.get_weights(), other.g_ab.get_weights()))
    real_a, real_b = _smooth((2, 32, 32, 1), 0), -_smooth((2, 32, 32, 1), 1)
    losses = [gan.train_step(real_a, real_b) for _ in range(8)]
    assert int(gan.step) == 8 and int(gan.g_opt.iterations) == 8
    assert losses[-1]["cycle"] < 0.9 * losses[0]["cycle"], [round(l["cycle"], 4) for l in losses]
    assert set(losses[0]) == {"g_total", "g_adv", "cycle", "identity", "d_a", "d_b"}


def test_image_pool_fills_then_swaps_half():
    assert ImagePool(0).query(np.ones((3, 2, 2, 1))).shape == (3, 2, 2, 1)
    pool = ImagePool(4, seed=0)
    first = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
    np.testing.assert_array_equal(pool.query(first), first)  # filling: the query itself
    queries = np.arange(100, 500, dtype=np.float32).reshape(400, 1, 1, 1)
    out = np.concatenate([pool.query(queries[i:i + 2]) for i in range(0, 400, 2)])
    swapped = out[:, 0, 0, 0] != queries[:, 0, 0, 0]
    assert 0.4 < swapped.mean() < 0.6
    assert np.all(out[swapped, 0, 0, 0] < queries[swapped, 0, 0, 0])  # past images only
    assert len(pool.images) == 4


def test_linear_decay_schedule():
    lr = linear_decay(2e-4, steps=100, decay_start=0.5)
    values = [float(lr(s)) for s in (0, 50, 75, 100, 120)]
    np.testing.assert_allclose(values, [2e-4, 2e-4, 1e-4, 0, 0], atol=1e-9)


def test_breast_crop_contains_breast_and_pads_small_images():
    stored = np.zeros((20, 16, 1), np.uint16)
    stored[2:6, 1:5] = 30000  # a small breast region in a corner
    for i in range(5):
        crop = breast_crop(tf.constant(stored), 24, tf.constant([0, i], tf.int64)).numpy()
        assert crop.shape == (24, 24, 1) and np.any(crop > -1) and crop.min() == -1
        assert np.allclose(crop[crop > -1], (30000 - 1) / 65534 * 2 - 1)


def test_nan_loss_names_pair_and_step(tiny_records, tmp_path, monkeypatch):
    from mammodg.records.reader import load_index

    monkeypatch.setattr(CycleGAN, "train_step", lambda self, a, b: {"g_total": float("nan")})
    cfg = _tiny_cfg(data_dir=str(tiny_records), steps=4, val_every=2, batch_size=2)
    with pytest.raises(TrainingError, match=r"PHANTOM\|VendorA <-> PHANTOM\|VendorB.*step 1"):
        train_pair(cfg, load_index(tiny_records), A, B, tmp_path, seed=0)


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
    assert "step 2/2" in out and "images/s" in out
    out = train(4)  # more steps: resumes the finished pair from its checkpoint
    assert "resuming from step 2" in out and "step 4/4" in out
    info = json.loads((run / "styles.json").read_text())
    assert info["styles"] == [A, B] and info["pairs"] == [[A, B]]
    assert {(g["src"], g["dst"]) for g in info["generators"]} == {(A, B), (B, A)}
    keras_file = run / info["generators"][0]["keras"]
    mtime = keras_file.stat().st_mtime_ns
    out = train(4)  # same command again: nothing to train
    assert "already trained to step 4" in out and keras_file.stat().st_mtime_ns == mtime
    assert (run / "style_grid.png").stat().st_size > 5000

    x = _smooth((1, 64, 48, 1), 2)
    gen = keras.models.load_model(keras_file)
    saved = tf.saved_model.load(str(run / info["generators"][0]["saved_model"]))  # keep a reference while serving
    served = saved.serve(tf.constant(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(gen(x)), served.numpy(), atol=1e-5)

    st = StyleTransfer.load(run)
    assert st.styles == [A, B]
    images = (x[:, :62, :46] + 1) / 2  # sides not multiples of 4
    masks = images > 0.3
    y = st.transfer(np.repeat(images, 3, 0), np.repeat(masks, 3, 0), A, B)
    assert y.shape == (3, 62, 46, 1) and y.dtype == np.float32
    assert y.min() >= 0 and y.max() <= 1 and np.all(y[~np.repeat(masks, 3, 0)] == 0)
    np.testing.assert_allclose(y[0], y[2], atol=1e-6)
    assert st.transfer(images, masks, B, B) is not None and np.array_equal(st.transfer(images, masks, B, B), images)
    with pytest.raises(ValueError, match="unknown style"):
        st.transfer(images, masks, A, "PHANTOM|VendorC")
