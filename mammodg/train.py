"""The shared trainer: strategy scope, EMA, validation cadence, best/last checkpoints, resume, TensorBoard.

A stage hands over a :class:`Task` (how to build the model, the loss, the training batches from a
start step, and how to score a validation pass); the trainer does the rest:

- ``MirroredStrategy`` over every visible GPU when there are several (one device: default strategy), and
  ``MultiWorkerMirroredStrategy`` with a custom loop when ``TF_CONFIG`` names a cluster (:mod:`mammodg.distributed`:
  only the chief writes the run folder, the other workers read it on resume);
- the stage's optimizer (default Adam) with Keras' EMA of every trainable weight (``use_ema``, decay
  ``ema_momentum``); validation, the best checkpoint and export use the EMA weights
  (``keras.callbacks.SwapEMAWeights``). A task with its own ``compile`` (several optimizers, e.g.
  CycleGAN) chooses its optimizers, and EMA only if its ``model.optimizer`` has it;
- every ``val_every`` steps: validation, ``history.json``, TensorBoard scalars, ``best.weights.h5``
  when the monitored metric improves (or every time, ``select_best=False``), and ``last.keras``
  (weights + optimizer state + EMA, the raw weights) with ``state.json`` (step, best, history);
- re-running the same command resumes from ``last.keras`` at the saved step; the sampler continues
  its choice sequence from that step (same proportions and label alternation; the order inside each
  stream is reshuffled). Only the fields in :data:`RESUMABLE_FIELDS` may differ from the run's
  ``config.yaml`` (``steps`` extends a run); any other difference is refused, naming the fields, and
  ``config.yaml`` is only written once the checks pass (a finished run keeps its own);
- a NaN or infinite loss (``keras.callbacks.TerminateOnNaN``) stops the run with an error naming the
  step and the last good checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from mammodg.io.atomic import atomic_path, atomic_write_json
from mammodg.config import ConfigError, TrainConfig, from_dict, save, to_dict
from mammodg.distributed import cluster, custom_loop, distribution_strategy, synchronize_batchnorm, worker_copy

# Config fields a resumed run may change: how long it trains, and what does not touch the model, the
# optimizer or the data order (a moved run folder, validation length, whether to export).
RESUMABLE_FIELDS = ("steps", "run_dir", "val_max_batches", "export", "jit_compile")


class TrainingError(RuntimeError):
    pass


class RunFolderError(ValueError):
    """A run folder file (``state.json``, ``last.keras``, ``config.yaml``) is damaged; the message says how
    to restart."""


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
    # compiles the model itself instead of ``loss``/``optimizer`` (e.g. a generator and a discriminator
    # optimizer) and builds every optimizer's variables; EMA only if it gives ``model.optimizer`` one
    compile: Callable[[object], None] | None = None
    # False: best.weights.h5 follows the latest validation (a GAN's losses do not rank its checkpoints)
    select_best: bool = True


def check_config(cfg: TrainConfig) -> None:
    """The trainer's own fields, before any work: each must be positive, and ``steps`` whole periods."""
    for name in ("batch_size", "steps", "val_every", "learning_rate"):
        value = getattr(cfg, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be > 0, got {value!r}")
    if cfg.steps % cfg.val_every:
        raise ConfigError(f"steps ({cfg.steps}) must be a multiple of val_every ({cfg.val_every})")


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config mappings."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _callbacks(trainer, ema: bool):
    """Progress and step count; then, at each period's end, the raw-weight checkpoint is staged, the
    EMA weights swapped in (Keras' SwapEMAWeights), and validation/best/state written with them."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            trainer.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            trainer.step, trainer.loss = trainer.epoch * trainer.cfg.val_every + batch + 1, (logs or {}).get("loss")
            if trainer.bar is not None:
                trainer.bar.update(1)
                if trainer.loss is not None:
                    trainer.bar.set_postfix(loss=f"{float(trainer.loss):.4f}", refresh=False)

        def on_epoch_end(self, epoch, logs=None):  # before the swap: last.keras holds the raw weights
            self.model.save(trainer.run_dir / ".last.keras")

    class Period(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            trainer.end_of_period(self.model, (epoch + 1) * trainer.cfg.val_every, logs or {})

    swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema else []
    return [Progress(), keras.callbacks.TerminateOnNaN(raise_error=True), *swap, Period()]


class Trainer:
    def __init__(self, cfg, run_dir: str | Path, task: Task):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.task = task
        self.workers, self.worker_index, self.is_chief = cluster()
        if not self.is_chief:  # writes go to a private copy of the chief's run folder (read on resume)
            self.run_dir = worker_copy(self.run_dir, self.worker_index)
        self.epoch, self.step, self.loss = 0, 0, None
        self.trained = False  # whether run() trained any step (False: the run was already finished)
        self.bar = None  # tqdm progress bar over the steps while training
        self.ckpt = self.run_dir / "last.keras"
        self.state_path = self.run_dir / "state.json"
        self.state = {"step": 0, "best": None, "best_step": None, "history": [], "done": False}
        self.period_start = time.perf_counter()

    def _compile(self, model):
        import keras

        if self.task.compile:
            self.task.compile(model)
            return
        ema = {"use_ema": True, "ema_momentum": self.cfg.ema_momentum}
        make = self.task.optimizer or (lambda **kw: keras.optimizers.Adam(self.task.learning_rate, **kw))
        opt = make(**ema)
        if self.cfg.mixed_precision == "mixed_float16":  # float16 gradients underflow without loss scaling
            opt = keras.optimizers.LossScaleOptimizer(opt)
        model.compile(optimizer=opt, loss=self.task.loss, jit_compile=self.cfg.jit_compile)
        model.optimizer.build(model.trainable_variables)  # optimizer (and EMA) variables exist before a resume

    def end_of_period(self, model, step, logs):
        import tensorflow as tf

        t = time.perf_counter()
        train_s = t - self.period_start
        scores = self.task.validate(model)
        monitor = scores["monitor"]
        improved = not self.task.select_best or self.state["best"] is None or monitor < self.state["best"]
        if improved:
            with atomic_path(self.run_dir / "best.weights.h5", suffix=".weights.h5") as tmp:
                model.save_weights(tmp)
        train = {k: float(v) for k, v in logs.items() if k != "loss"}
        entry = {"step": step, "train_loss": float(logs.get("loss", float("nan"))),
                 **({"train": train} if train else {}), **scores, "steps_per_s": round(self.cfg.val_every / max(train_s, 1e-9), 3),
                 "validation_s": round(time.perf_counter() - t, 2)}
        self.state["history"].append(entry)
        if improved:
            self.state.update(best=monitor, best_step=step)
        with self.writer.as_default(step=step):
            tf.summary.scalar("train/loss", entry["train_loss"])
            for k, v in train.items():
                tf.summary.scalar(f"train/{k}", v)
            for k, v in scores.get("global", {}).items():
                if v is not None:
                    tf.summary.scalar(f"val/{k}", v)
            for seg, vals in scores.get("segments", {}).items():
                for k, v in vals.items():
                    if v is not None:
                        tf.summary.scalar(f"val_{seg}/{k}", v)
        self.writer.flush()
        self.state["step"] = step
        os.replace(self.run_dir / ".last.keras", self.ckpt)
        atomic_write_json(self.state_path, self.state)
        atomic_write_json(self.run_dir / "history.json", self.state["history"])
        line = (f"step {step}/{self.cfg.steps}: loss {entry['train_loss']:.4f}  val monitor {monitor:.4f}"
                f"{'  (best)' if improved and self.task.select_best else ''}  {entry['steps_per_s']:.2f} steps/s")
        if self.bar is not None:
            self.bar.write(line)  # above the progress bar
        else:
            print(line, flush=True)
        self.period_start = time.perf_counter()

    def _damaged(self, path, error) -> RunFolderError:
        """One line: the file, the first line of the reason, and how to restart."""
        reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
        return RunFolderError(f"{path}: damaged ({reason}); delete {self.ckpt} and {self.state_path} (or the whole "
                              f"run folder {self.run_dir}) to restart from step 0")

    def _read_state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
            if not (isinstance(state, dict) and isinstance(state.get("step"), int)
                    and isinstance(state.get("history"), list)):
                raise ValueError("not a trainer state (step, history)")
        except (ValueError, UnicodeDecodeError) as e:
            raise self._damaged(self.state_path, e) from None
        return {"best": None, "best_step": None, "done": False, **state}

    def _check_saved_config(self, resume: bool) -> bool:
        """Refuse a resume whose config differs in more than :data:`RESUMABLE_FIELDS`; whether to write config.yaml."""
        import yaml

        path = self.run_dir / "config.yaml"
        if not (resume and path.is_file()):
            return True
        try:
            old = to_dict(from_dict(type(self.cfg), yaml.safe_load(path.read_text()) or {}, str(path)))
        except (yaml.YAMLError, ConfigError, UnicodeDecodeError, TypeError) as e:
            raise self._damaged(path, e) from None
        changed = [f for f in config_changes(old, to_dict(self.cfg)) if f not in RESUMABLE_FIELDS]
        if changed:
            raise ConfigError(f"{self.run_dir} was trained with another configuration: {', '.join(changed)} differ "
                              f"from its config.yaml; only {', '.join(RESUMABLE_FIELDS)} may change on resume. Use "
                              f"another run_dir, or delete {self.run_dir} to retrain")
        finished = self.state["step"] >= self.cfg.steps
        return not finished  # a finished run keeps its config

    def _load_checkpoint(self, model) -> None:
        try:
            model.load_weights(self.ckpt)
        except Exception as e:  # noqa: BLE001  (a truncated zip, a missing or mismatched weight, ...)
            raise self._damaged(self.ckpt, e) from None

    def run(self):
        """Train to ``cfg.steps`` (resuming when a checkpoint exists); returns the model with best EMA weights."""
        import keras

        cfg = self.cfg
        check_config(cfg)
        self.strategy = strategy = distribution_strategy()
        if cfg.batch_size % strategy.num_replicas_in_sync:  # each replica takes an equal slice of the global batch
            raise ConfigError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of replicas "
                              f"({strategy.num_replicas_in_sync})")
        if self.task.compile and cfg.mixed_precision == "mixed_float16":
            raise ConfigError(f"mixed_precision: the {cfg.stage} stage compiles its own optimizers without loss "
                              "scaling; use mixed_bfloat16 or float32")
        resume = self.ckpt.is_file() and self.state_path.is_file()
        if resume:
            self.state = self._read_state()
        write_config = self._check_saved_config(resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if write_config:
            save(cfg, self.run_dir / "config.yaml")
        keras.utils.set_random_seed(cfg.seed)
        policy = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy(cfg.mixed_precision)  # read by every layer built below
        try:
            with strategy.scope():
                model = self.task.build_model()
                if not resume and self.task.after_build:
                    self.task.after_build(model)
                self._compile(model)
                model.jit_compile = cfg.jit_compile  # also for a task that compiles itself (Keras: off under tf.distribute)
                if resume:
                    self._load_checkpoint(model)
        finally:
            keras.mixed_precision.set_global_policy(policy)
        if strategy.num_replicas_in_sync > 1:
            synchronize_batchnorm(model)
        if self.state["step"] >= cfg.steps:
            print(f"{self.run_dir} already trained to step {self.state['step']}", flush=True)
        else:
            if resume:
                print(f"resuming {self.run_dir} from step {self.state['step']}", flush=True)
            self._fit(model)
        model.load_weights(self.run_dir / "best.weights.h5")
        if not self.is_chief:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # the worker's private copy (checkpoints: the chief's)
        return model

    def _fit(self, model):
        import tensorflow as tf
        from tqdm import tqdm

        cfg = self.cfg
        self.writer = tf.summary.create_file_writer(str(self.run_dir / "tensorboard"))
        self.epoch = self.state["step"] // cfg.val_every
        data = self.task.batches(self.state["step"])
        self.bar = tqdm(total=cfg.steps, initial=self.state["step"], desc=f"train {cfg.stage}", unit="step",
                        mininterval=5, dynamic_ncols=True)
        self.period_start = time.perf_counter()
        self.trained = True
        optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # inside a LossScaleOptimizer
        callbacks = _callbacks(self, getattr(optimizer, "use_ema", False))
        try:
            if self.workers > 1:  # model.fit fails under MultiWorkerMirroredStrategy in Keras 3.15
                custom_loop(self.strategy, model, data, callbacks, cfg, self.epoch)
            else:
                model.fit(data, steps_per_epoch=cfg.val_every, epochs=cfg.steps // cfg.val_every,
                          initial_epoch=self.epoch, shuffle=False, callbacks=callbacks, verbose=0)
        except RuntimeError as e:
            if self.loss is None or math.isfinite(float(self.loss)):
                raise
            last = (f"{self.ckpt} (step {self.state['step']})" if self.ckpt.is_file()
                    else "none (no period finished yet)")
            raise TrainingError(f"loss became NaN/inf at step {self.step}; last good checkpoint: {last}. "
                                "Lower learning_rate or check the data.") from None
        finally:
            self.bar.close()
            self.bar = None
        self.state["done"] = True
        atomic_write_json(self.state_path, self.state)
