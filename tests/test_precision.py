"""Mixed precision and XLA: the trainer applies ``mixed_precision`` and ``jit_compile`` to any stage, losses stay
float32, and a few bf16 steps give the float32 losses within tolerance."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from mammodg.config import ConfigError, TrainConfig, VGGConfig
from mammodg.losses import NTXent, nt_xent, sigmoid_focal_loss
from mammodg.train import Task, Trainer


def _history(cfg, task, run_dir):
    model = Trainer(cfg, run_dir, task).run()
    return model, json.loads((run_dir / "history.json").read_text())


def test_classifier_in_bf16_matches_float32(vgg_records, tmp_path):
    """The classifier stage under mixed_bfloat16: bf16 layers, float32 variables, and the validation WLL (inference
    mode) of float32 within 1%. (Training-mode losses of this 2-filter test network differ more: BatchNorm over 4
    images amplifies bf16 rounding; the toy model below compares training losses.)"""
    from mammodg.stages.classifier import classifier_task

    # a small learning rate: the runs compare the two precisions' forward passes, not diverging trajectories
    cfg = TrainConfig(stage="classifier", data_dir=str(vgg_records), batch_size=4, steps=2, val_every=2,
                      learning_rate=1e-5, val_max_batches=1, export=False, vgg=VGGConfig(width=0.0625))
    cfg.classifier.init_from = ""
    f32, h32 = _history(cfg, classifier_task(cfg), tmp_path / "f32")
    bf16_cfg = TrainConfig(**{**cfg.__dict__, "mixed_precision": "mixed_bfloat16"})
    bf16, h16 = _history(bf16_cfg, classifier_task(bf16_cfg), tmp_path / "bf16")
    assert keras.mixed_precision.global_policy().name == "float32"  # restored after the build
    assert {layer.compute_dtype for layer in f32.layers} == {"float32"}
    assert "bfloat16" in {layer.compute_dtype for layer in bf16.layers}
    assert all(v.dtype == "float32" for v in bf16.weights)  # variables stay float32
    assert all(np.isfinite([h["train_loss"] for h in h32 + h16]))
    np.testing.assert_allclose([h["monitor"] for h in h16], [h["monitor"] for h in h32], rtol=0.01)


def _toy(tmp_path, name, **fields):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    def build():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])

    def validate(model):
        p = keras.ops.convert_to_numpy(keras.ops.softmax(keras.ops.cast(model(x), "float32"), axis=-1))
        return {"monitor": float(-np.log(p[np.arange(64), y]).mean())}

    task = Task(build, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                lambda start: tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8), validate, 0.01)
    cfg = TrainConfig(steps=6, val_every=3, seed=0, **fields)
    keras.utils.set_random_seed(0)
    return _history(cfg, task, tmp_path / name)


def _losses(history):
    return [h["train_loss"] for h in history]


def test_bf16_and_float16_training_losses_match_float32_and_jit_compiles(tmp_path):
    _, ref = _toy(tmp_path, "f32")
    ref = _losses(ref)
    model, bf16 = _toy(tmp_path, "bf16", mixed_precision="mixed_bfloat16")
    assert model.layers[0].compute_dtype == "bfloat16"
    np.testing.assert_allclose(_losses(bf16), ref, rtol=0.02)
    model, f16 = _toy(tmp_path, "f16", mixed_precision="mixed_float16")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    np.testing.assert_allclose(_losses(f16), ref, rtol=0.01)
    model, xla = _toy(tmp_path, "xla", jit_compile=True)
    assert model.jit_compile is True
    np.testing.assert_allclose(_losses(xla), ref, rtol=1e-5)


def test_float16_is_refused_for_a_stage_that_compiles_itself(tmp_path):
    task = Task(lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), None, None, None, 0.1,
                compile=lambda m: m.compile(keras.optimizers.Adam()))
    with pytest.raises(ConfigError, match="mixed_precision: .*use mixed_bfloat16"):
        Trainer(TrainConfig(mixed_precision="mixed_float16", steps=2, val_every=1), tmp_path, task).run()


def _nt_xent_reference(z1, z2, tau):
    """NT-Xent in float64 numpy: mean over the 2N anchors of -log softmax of the positive, self excluded."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / tau
    np.fill_diagonal(s, -np.inf)
    n = len(z1)
    pos = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
    return float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(2 * n), pos]))


def test_nt_xent_and_focal_loss_stay_finite_in_bf16():
    rng = np.random.default_rng(0)
    z1, z2 = (rng.normal(scale=300.0, size=(8, 16)) for _ in range(2))  # large projections: bf16 sums of squares
    b1, b2 = (tf.constant(z, tf.bfloat16) for z in (z1, z2))
    loss = nt_xent(b1, b2, temperature=0.05)
    assert loss.dtype == "float32" and np.isfinite(float(loss))
    rounded = [tf.cast(b, tf.float64).numpy() for b in (b1, b2)]  # the values bf16 holds
    np.testing.assert_allclose(float(loss), _nt_xent_reference(*rounded, 0.05), rtol=1e-4)
    keras_loss = NTXent(0.05)(tf.zeros((8,)), tf.stack([b1, b2], axis=1))  # the Keras loss under a bf16 model output
    assert keras_loss.dtype == "float32" and np.isfinite(float(keras_loss))
    logits = tf.constant([[-80.0, -5.0, 0.0, 5.0, 80.0]], tf.bfloat16)  # exp overflows in neither dtype
    labels = tf.constant([[1.0, 0.0, 1.0, 1.0, 0.0]])
    focal = sigmoid_focal_loss(labels, logits)
    assert focal.dtype == "float32" and np.all(np.isfinite(focal.numpy()))
    x, y = logits.numpy().astype(np.float64), labels.numpy()
    p = 1 / (1 + np.exp(-x))
    p_t = y * p + (1 - y) * (1 - p)
    bce = np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))
    np.testing.assert_allclose(focal.numpy(), (0.25 * y + 0.75 * (1 - y)) * (1 - p_t) ** 2 * bce, rtol=1e-4, atol=1e-30)
