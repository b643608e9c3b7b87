"""The shared trainer and the periodic-sampling stages, from the command line; resume; NaN stop; EMA."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import mammodg.models  # noqa: F401  (registers the custom layers for load_model)
from mammodg.config import TrainConfig
from mammodg.train import Task, Trainer, TrainingError


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mammodg.cli", *args], capture_output=True, text=True, **kw)


def _common(data, run):
    return ["--set", f"data_dir={data}", "--set", f"run_dir={run}", "--set", "width=0.0625",
            "--set", "batch_size=4", "--set", "val_max_batches=2"]


def test_patch_then_classifier_then_evaluate(vgg_records, tmp_path):
    patch = _cli("train", "--stage", "patch", *_common(vgg_records, tmp_path / "patch"), "--set", "steps=4",
                 "--set", "val_every=2", "--set", "patch.patch_size=192", timeout=600)
    assert patch.returncode == 0, patch.stderr[-3000:]
    assert (tmp_path / "patch" / "best.weights.h5").is_file() and (tmp_path / "patch" / "saved_model").is_dir()
    hist = json.loads((tmp_path / "patch" / "history.json").read_text())
    assert [h["step"] for h in hist] == [2, 4] and "wll_lesion" in hist[0]["global"]
    cls = _cli("train", "--stage", "classifier", *_common(vgg_records, tmp_path / "cls"), "--set", "steps=4",
               "--set", "val_every=2", "--set", f"classifier.init_from={tmp_path / 'patch'}", "--set", "patch.patch_size=192", timeout=600)
    assert cls.returncode == 0, cls.stderr[-3000:]
    assert "backbone initialised" in cls.stdout and "sampling proportions" in cls.stdout
    assert list((tmp_path / "cls" / "tensorboard").iterdir())
    ev = _cli("evaluate", "--run", str(tmp_path / "cls"), "--n-boot", "50", timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    rep = json.loads((tmp_path / "cls" / "report_val" / "report.json").read_text())
    assert set(rep["segments"]) <= {"PHANTOM|VendorA", "PHANTOM|VendorB", "PHANTOM|VendorC"}
    assert (tmp_path / "cls" / "report_val" / "roc.png").stat().st_size > 10000


def test_killed_classifier_run_resumes(vgg_records, tmp_path):
    run = tmp_path / "cls"
    args = ["train", "--stage", "classifier", *_common(vgg_records, run), "--set", "steps=6", "--set", "val_every=2",
            "--set", "classifier.init_from="]  # from scratch (the demo config's patch run need not exist)
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mammodg.cli", *args], stdout=log, stderr=subprocess.STDOUT)
    state = run / "state.json"
    deadline = time.time() + 1200  # generous: CI machines may be slow or shared
    while time.time() < deadline and proc.poll() is None and not (state.is_file() and json.loads(state.read_text())["step"] >= 2):
        time.sleep(0.2)
    assert state.is_file(), "no checkpoint before the deadline or exited early:\n" + (tmp_path / "killed.log").read_text()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 2 <= killed_at < 6
    model = keras.models.load_model(run / "last.keras")
    assert int(model.optimizer.iterations.numpy()) == killed_at  # optimizer state (and its EMA) saved
    ema = model.optimizer._model_variables_moving_average
    assert any(not np.allclose(e.numpy(), v.numpy()) for e, v in zip(ema, model.trainable_variables))
    again = _cli(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run} from step {killed_at}" in again.stdout
    steps = [h["step"] for h in json.loads((run / "history.json").read_text())]
    assert steps == [2, 4, 6]
    assert json.loads(state.read_text())["done"] is True
    third = _cli(*args, timeout=600)
    assert "already trained" in third.stdout


def _toy_task(loss, lr=0.05):
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")

    def build():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

    def validate(model):
        p = keras.ops.convert_to_numpy(keras.ops.softmax(model(x), axis=-1))
        return {"monitor": float(-np.log(p[np.arange(64), y]).mean())}

    return Task(build, loss, lambda start: tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(8), validate, lr)


def test_nan_loss_stops_with_step(tmp_path):
    calls = tf.Variable(0)

    def nan_after_3(y_true, y_pred):
        calls.assign_add(1)
        base = keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        return tf.where(calls > 3, np.nan, base)

    cfg = TrainConfig(steps=10, val_every=5)
    with pytest.raises(TrainingError, match="step 4"):
        Trainer(cfg, tmp_path / "run", _toy_task(nan_after_3)).run()


def test_ema_weights_used_for_best_checkpoint(tmp_path):
    cfg = TrainConfig(steps=10, val_every=5, ema_momentum=0.9)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trainer = Trainer(cfg, tmp_path / "run", _toy_task(loss))
    model = trainer.run()
    last = keras.models.load_model(tmp_path / "run" / "last.keras")
    ema = [v.numpy() for v in last.optimizer._model_variables_moving_average]
    raw = [v.numpy() for v in last.trainable_variables]
    best = [v.numpy() for v in model.trainable_variables]
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in hist] == [5, 10]
    if trainer.state["best_step"] == 10:  # the best checkpoint holds the EMA, not the raw weights
        assert all(np.allclose(b, e) for b, e in zip(best, ema))
        assert not all(np.allclose(b, r) for b, r in zip(best, raw))
