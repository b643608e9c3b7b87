"""The shared trainer: strategy scope, EMA, validation cadence, best/last checkpoints, resume, TensorBoard.

A stage hands over a :class:`Task` (how to build the model, the loss, the training batches from a
start step, and how to score a validation pass); the trainer does the rest:

- ``MirroredStrategy`` over every visible GPU when there are several (one device: default strategy);
- the stage's optimizer (default Adam) with Keras' EMA of every trainable weight (``use_ema``, decay
  ``ema_momentum``);
  validation and export use the EMA weights;
- every ``val_every`` steps: validation, ``history.json``, TensorBoard scalars, ``best.weights.h5``
  when the monitored metric improves, and ``last.keras`` (weights + optimizer + EMA) with
  ``state.json`` (step, best, history) written atomically;
- re-running the same command resumes from ``last.keras`` at the saved step; the sampler continues
  its choice sequence from that step (same proportions and label alternation; the order inside each
  stream is reshuffled);
- a NaN or infinite loss stops the run with an error naming the step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

from mammodg.config import save


class TrainingError(RuntimeError):
    pass


@dataclasses.dataclass
class Task:
    build_model: Callable[[], object]  # -> uncompiled keras.Model
    loss: object
    batches: Callable[[int], object]  # start_step -> infinite tf.data.Dataset of (x, y)
    validate: Callable[[object], dict]  # model -> {"monitor": float (lower is better), ...}
    learning_rate: float
    after_build: Callable[[object], None] | None = None  # e.g. load a pre-trained backbone (fresh runs only)
    # optimizer factory taking Keras' EMA keywords (use_ema, ema_momentum); default: Adam(learning_rate)
    optimizer: Callable[..., object] | None = None


def distribution_strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def atomic_json(path: Path, data) -> None:
    """Write JSON through a temporary name renamed into place (never a half-written file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class _EMAWeights:
    """Context manager: the model's trainable weights are the optimizer's EMA inside the block."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        opt = self.model.optimizer
        self.saved = [v.numpy() for v in self.model.trainable_variables]
        if getattr(opt, "use_ema", False) and getattr(opt, "_model_variables_moving_average", None):
            opt._overwrite_model_variables_with_average_value(self.model.trainable_variables)
        return self.model

    def __exit__(self, *exc):
        for v, value in zip(self.model.trainable_variables, self.saved):
            v.assign(value)


def _callback(trainer):
    import keras

    class Cb(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if trainer.bar is not None:
                trainer.bar.update(1)
                if loss is not None:
                    trainer.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            if loss is not None and not math.isfinite(float(loss)):
                trainer.nan_step = trainer.step_of(batch)
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            if trainer.nan_step is None:
                trainer.end_of_period(self.model, (epoch + 1) * trainer.cfg.val_every, logs or {})

    return Cb()


class Trainer:
    def __init__(self, cfg, run_dir: str | Path, task: Task):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.task = task
        self.nan_step = None
        self.epoch = 0
        self.bar = None  # tqdm progress bar over the steps while training
        self.ckpt = self.run_dir / "last.keras"
        self.state_path = self.run_dir / "state.json"
        self.state = {"step": 0, "best": None, "best_step": None, "history": [], "done": False}

    def step_of(self, batch):
        return self.epoch * self.cfg.val_every + batch + 1

    def _compile(self, model):
        import keras

        ema = {"use_ema": True, "ema_momentum": self.cfg.ema_momentum}
        opt = self.task.optimizer(**ema) if self.task.optimizer else keras.optimizers.Adam(self.task.learning_rate, **ema)
        model.compile(optimizer=opt, loss=self.task.loss)

    def end_of_period(self, model, step, logs):
        import tensorflow as tf

        t = time.perf_counter()
        with _EMAWeights(model):
            scores = self.task.validate(model)
            monitor = scores["monitor"]
            improved = self.state["best"] is None or monitor < self.state["best"]
            if improved:
                model.save_weights(self.run_dir / ".best.weights.h5")
                os.replace(self.run_dir / ".best.weights.h5", self.run_dir / "best.weights.h5")
        entry = {"step": step, "train_loss": float(logs.get("loss", float("nan"))), **scores,
                 "validation_s": round(time.perf_counter() - t, 2)}
        self.state["history"].append(entry)
        if improved:
            self.state.update(best=monitor, best_step=step)
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", entry["train_loss"])
            for k, v in scores.get("global", {}).items():
                if v is not None:
                    tf.summary.scalar(f"val/{k}", v)
            for seg, vals in scores.get("segments", {}).items():
                for k, v in vals.items():
                    if v is not None:
                        tf.summary.scalar(f"val_{seg}/{k}", v)
        self.writer.flush()
        self.state["step"] = step
        model.save(self.run_dir / ".last.keras")
        os.replace(self.run_dir / ".last.keras", self.ckpt)
        atomic_json(self.state_path, self.state)
        atomic_json(self.run_dir / "history.json", self.state["history"])
        line = f"step {step}: loss {entry['train_loss']:.4f}  val monitor {monitor:.4f}{'  (best)' if improved else ''}"
        if self.bar is not None:
            self.bar.write(line)  # above the progress bar
        else:
            print(line, flush=True)

    def run(self):
        """Train to ``cfg.steps`` (resuming when a checkpoint exists); returns the model with best EMA weights."""
        import keras
        import tensorflow as tf

        cfg = self.cfg
        if cfg.steps % cfg.val_every:
            raise TrainingError(f"steps ({cfg.steps}) must be a multiple of val_every ({cfg.val_every})")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save(cfg, self.run_dir / "config.yaml")
        keras.utils.set_random_seed(cfg.seed)
        strategy = distribution_strategy()
        resume = self.ckpt.is_file() and self.state_path.is_file()
        with strategy.scope():
            if resume:
                self.state = json.loads(self.state_path.read_text())
                model = keras.models.load_model(self.ckpt)
                print(f"resuming {self.run_dir} from step {self.state['step']}", flush=True)
            else:
                model = self.task.build_model()
                if self.task.after_build:
                    self.task.after_build(model)
                self._compile(model)
        if self.state.get("done") or self.state["step"] >= cfg.steps:
            print(f"{self.run_dir} already trained to step {self.state['step']}", flush=True)
        else:
            self.writer = tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))
            self.epoch = self.state["step"] // cfg.val_every
            data = self.task.batches(self.state["step"])
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=self.state["step"], desc=f"train {cfg.stage}", unit="step",
                            mininterval=5, dynamic_ncols=True)
            try:
                model.fit(data, steps_per_epoch=cfg.val_every, epochs=cfg.steps // cfg.val_every,
                          initial_epoch=self.epoch, callbacks=[_callback(self), _EpochCounter(self)], verbose=0)
            finally:
                self.bar.close()
                self.bar = None
            if self.nan_step is not None:
                raise TrainingError(f"loss became NaN/inf at step {self.nan_step}; last good checkpoint: "
                                    f"{self.ckpt} (step {self.state['step']}). Lower learning_rate or check the data.")
            self.state["done"] = True
            atomic_json(self.state_path, self.state)
        model.load_weights(self.run_dir / "best.weights.h5")
        return model


def _EpochCounter(trainer):
    import keras

    class C(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            trainer.epoch = epoch

    return C()
