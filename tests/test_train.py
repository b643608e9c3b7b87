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
from mammodg.config import ConfigError, CycleGANConfig, TrainConfig, VGGConfig, load
from mammodg.train import RunFolderError, Task, Trainer, TrainingError


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "mammodg.cli", *args], capture_output=True, text=True, **kw)


def _common(data, run):
    return ["--set", f"data_dir={data}", "--set", f"run_dir={run}", "--set", "vgg.width=0.0625",
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
    ema = _averages(model.optimizer)
    assert len(ema) == len(model.trainable_variables)
    assert any(not np.allclose(e.numpy(), v.numpy()) for e, v in zip(ema, model.trainable_variables))
    again = _cli(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run} from step {killed_at}" in again.stdout
    steps = [h["step"] for h in json.loads((run / "history.json").read_text())]
    assert steps == [2, 4, 6]
    assert json.loads(state.read_text())["done"] is True
    third = _cli(*args, timeout=600)
    assert "already trained" in third.stdout


def _averages(optimizer):
    """The optimizer's EMA of each trainable weight, from its public variable list (Keras names them *_average)."""
    return [v for v in optimizer.variables if v.path.endswith("_average")]


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
    """best.weights.h5 holds the optimizer's EMA of the weights (validated with them), not the raw ones."""
    cfg = TrainConfig(steps=10, val_every=5, ema_momentum=0.9)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    task = _toy_task(loss)
    seen = []

    def validate(model):  # records the weights validation ran on; always "improves" so step 10 is the best
        seen.append([v.numpy().copy() for v in model.trainable_variables])
        return {"monitor": -len(seen)}

    task.validate = validate
    trainer = Trainer(cfg, tmp_path / "run", task)
    model = trainer.run()
    assert trainer.state["best_step"] == 10
    last = keras.models.load_model(tmp_path / "run" / "last.keras")  # raw weights + optimizer state at step 10
    ema = [v.numpy() for v in _averages(last.optimizer)]
    raw = [v.numpy() for v in last.trainable_variables]
    assert len(ema) == len(raw) == 2
    best = keras.models.clone_model(last)
    best.load_weights(tmp_path / "run" / "best.weights.h5")
    best = [v.numpy() for v in best.trainable_variables]
    assert all(np.allclose(b, e, atol=1e-7) for b, e in zip(best, ema))
    assert not all(np.allclose(b, r, atol=1e-4) for b, r in zip(best, raw))
    assert all(np.allclose(s, e, atol=1e-7) for s, e in zip(seen[-1], ema))  # validation saw the EMA
    assert all(np.allclose(m.numpy(), e, atol=1e-7) for m, e in zip(model.trainable_variables, ema))
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in hist] == [5, 10]


def _toy_cfg(**kw):
    return TrainConfig(**{"steps": 4, "val_every": 2, "learning_rate": 0.05, **kw})


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_changed_config_refused_on_resume_and_finished_run_keeps_its_config(tmp_path):
    run = tmp_path / "run"
    Trainer(_toy_cfg(), run, _toy_task(_loss())).run()
    saved = (run / "config.yaml").read_text()
    for change, fields in [({"learning_rate": 0.01}, "learning_rate"), ({"seed": 3, "vgg": VGGConfig(width=0.5)}, "seed, vgg.width"),
                           ({"cyclegan": CycleGANConfig(pool_size=3)}, "cyclegan.pool_size")]:
        with pytest.raises(ConfigError, match=f": {fields} differ"):
            Trainer(_toy_cfg(steps=6, **change), run, _toy_task(_loss())).run()
        assert (run / "config.yaml").read_text() == saved  # untouched by the refused run
    # finished: an allowed change (validation length) trains nothing and keeps the run's config
    again = Trainer(_toy_cfg(val_max_batches=3), run, _toy_task(_loss()))
    again.run()
    assert not again.trained and (run / "config.yaml").read_text() == saved
    # more steps: resumes and records the new length
    longer = Trainer(_toy_cfg(steps=6), run, _toy_task(_loss()))
    longer.run()
    assert longer.trained and [h["step"] for h in json.loads((run / "history.json").read_text())] == [2, 4, 6]
    assert load(TrainConfig, run / "config.yaml").steps == 6


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("steps", -4), ("val_every", 0), ("learning_rate", 0.0),
                                         ("learning_rate", -1e-3), ("learning_rate", float("nan"))])
def test_non_positive_training_fields_are_config_errors(tmp_path, field, value):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"^{field} must be > 0"):
        Trainer(_toy_cfg(**{field: value}), run, _toy_task(_loss())).run()
    assert not run.exists()  # refused before any work


def test_cli_refuses_zero_batch_size_before_reading_data(tmp_path, capsys):
    from mammodg.cli import main

    rc = main(["train", "--stage", "classifier", "--set", f"data_dir={tmp_path / 'none'}", "--set",
               f"run_dir={tmp_path / 'run'}", "--set", "batch_size=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "batch_size must be > 0" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name,damage", [("state.json", b'{"step": 2, "hist'), ("state.json", b"[1, 2]"),
                                         ("state.json", b"\xff\xfe"), ("last.keras", None)])
def test_damaged_run_files_are_one_line_errors_naming_the_file(tmp_path, name, damage):
    run = tmp_path / "run"
    Trainer(_toy_cfg(steps=2), run, _toy_task(_loss())).run()
    path = run / name
    path.write_bytes(damage if damage is not None else path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(RunFolderError) as e:
        Trainer(_toy_cfg(steps=4), run, _toy_task(_loss())).run()
    msg = str(e.value)
    assert str(path) in msg and "delete" in msg and "restart" in msg and "\n" not in msg
    assert isinstance(e.value, ValueError)  # the CLI reports it in one line with exit status 2


def test_damaged_shards_stop_training_with_the_shard_named(vgg_records, tmp_path):
    """A shortened shard is caught by the quick verify before any training (exit 2, the shard named); a
    corrupted byte inside a record (same length, CRC mismatch) stops the run with exit 1 and one line
    pointing at `mammodg verify`, which names the shard."""
    import shutil

    from mammodg.records.reader import load_index

    def damaged(name, damage):
        data = tmp_path / name
        shutil.copytree(vgg_records, data)
        index = load_index(data)
        shard = next(data / s["path"] for segs in index["splits"]["train"].values() for e in segs.values()
                     for s in e["shards"])
        raw = bytearray(shard.read_bytes())
        shard.write_bytes(damage(raw))
        return data, shard

    args = ["--set", "steps=2", "--set", "val_every=2", "--set", "classifier.init_from=", "--set", "export=false"]
    data, shard = damaged("short", lambda raw: bytes(raw[:-100]))
    out = _cli("train", "--stage", "classifier", *_common(data, tmp_path / "r1"), *args, timeout=600)
    assert out.returncode == 2 and str(shard) in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "r1" / "state.json").exists()

    def flip(raw):
        raw[len(raw) // 2] ^= 0xFF  # inside a record's data: same size, bad CRC
        return bytes(raw)

    data, shard = damaged("flipped", flip)
    out = _cli("train", "--stage", "classifier", *_common(data, tmp_path / "r2"), *args, timeout=600)
    assert out.returncode == 1 and "mammodg verify" in out.stderr and str(shard) in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("mammodg train: stopped: a shard under")
    check = _cli("verify", str(data), timeout=300)
    assert check.returncode == 2 and str(shard) in check.stderr
