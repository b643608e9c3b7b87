"""Distributed training for the shared trainer (:mod:`mammodg.train`): the cluster from ``TF_CONFIG``, the
strategy, synchronized BatchNorm, per-worker input and the custom training loop used under
``MultiWorkerMirroredStrategy`` (Keras 3.15's ``model.fit`` fails there: keras #20585, #20329, tensorflow #72388).

Under several workers each worker trains its slice of every global batch; gradients, BatchNorm statistics
and metrics are reduced over all replicas, so every worker holds the same weights. Only the chief writes the
run folder; the others write into a private copy (:func:`worker_copy`).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

from mammodg.config import ConfigError


def cluster() -> tuple[int, int, bool]:
    """(number of workers, this worker's index, whether it is the chief) from ``TF_CONFIG``; (1, 0, True)
    without one. The chief is the task of type ``chief``, else worker 0."""
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        spec, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    except (ValueError, AttributeError) as e:
        raise ConfigError(f"TF_CONFIG: not a JSON cluster description ({e})") from None
    order = [("chief", i) for i in range(len(spec.get("chief", [])))] + [("worker", i) for i in range(len(spec.get("worker", [])))]
    if len(order) < 2:
        return 1, 0, True
    me = (task.get("type"), int(task.get("index", 0)))
    if me not in order:
        raise ConfigError(f"TF_CONFIG: task {me} is not in its cluster {sorted(spec)}")
    return len(order), order.index(me), order.index(me) == 0


@functools.cache
def distribution_strategy():
    """MultiWorkerMirroredStrategy when ``TF_CONFIG`` names a cluster of several workers (created once, before
    other TensorFlow work: collectives are configured at startup); else MirroredStrategy over the GPUs when
    there are several; else the default strategy."""
    import tensorflow as tf

    if cluster()[0] > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()


def all_layers(model) -> list:
    """Every layer inside ``model``, nested models and the sublayers of custom layers (attributes, lists and
    dicts of layers) included, each once."""
    import keras

    out, seen, todo = [], set(), [model]
    while todo:
        obj = todo.pop()
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, keras.layers.Layer) and id(obj) not in seen:
            seen.add(id(obj))
            out.append(obj)
            todo.extend(vars(obj).values())
    return out[1:]


def synchronize_batchnorm(model) -> int:
    """Make every BatchNormalization of ``model`` (nested models and custom layers included) use cross-replica
    statistics, so N replicas train as one device on the global batch, moving statistics included (and the
    contrastive model cannot tell positives apart by per-replica statistics); returns how many layers there
    are. Called under several replicas."""
    import keras

    bns = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bns:
        layer.synchronized = True
    return len(bns)


def worker_copy(run_dir: Path, index: int) -> Path:
    """A non-chief worker's private run folder: a temporary folder holding copies of the chief's checkpoint,
    state and best weights (what a resume reads); removed when the run ends."""
    out = Path(tempfile.mkdtemp(prefix=f"mammodg-worker{index}-"))
    for name in ("last.keras", "state.json", "config.yaml", "best.weights.h5"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out / name)
    return out


def distribute_batches(strategy, data):
    """Global batches -> per-replica slices: each worker keeps its replicas' slices of every global batch
    (AutoShardPolicy.DATA after Keras-like rebatching), so no two workers feed the same samples."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(data.with_options(options))


def custom_loop(strategy, model, data, callbacks, cfg, initial_epoch: int) -> None:
    """``model.fit``'s schedule with ``strategy.run(model.train_step)``: the same loss scaling (Keras' losses
    divide by the replica count; gradients are summed over replicas), optimizer and EMA updates, and the same
    callbacks. The global batch is split over the workers (AutoShardPolicy.DATA: worker k keeps its slice of
    every global batch, :func:`distribute_batches`), so the sampling proportions hold over the global batch.
    ``strategy`` is passed in and the steps run in its scope (``tf.distribute.get_strategy()`` outside the scope
    is the default strategy: every worker would train the whole global batch on its own, nothing all-reduced)."""
    import keras
    import tensorflow as tf

    batches = iter(distribute_batches(strategy, data))
    replicas = strategy.num_replicas_in_sync

    def local(x, spec):  # the replica's static batch size (the distributed input forgets it), as in one process
        n = spec.shape[0] if spec.shape.rank else None
        return tf.ensure_shape(x, [n // replicas, *spec.shape[1:]]) if n is not None and n % replicas == 0 else x

    def train_step(batch):
        return model.train_step(tf.nest.map_structure(local, batch, data.element_spec))

    @tf.function
    def step(iterator):
        logs = strategy.run(train_step, args=(next(iterator),))
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in logs.items()}

    epochs = cfg.steps // cfg.val_every
    hooks = keras.callbacks.CallbackList(callbacks, model=model, epochs=epochs, steps=cfg.val_every, verbose=0)
    logs = {}
    hooks.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        for batch in range(cfg.val_every):
            hooks.on_train_batch_begin(batch)
            with strategy.scope():
                logs = {k: float(v) for k, v in step(batches).items()}
            hooks.on_train_batch_end(batch, logs)
        hooks.on_epoch_end(epoch, logs)
    hooks.on_train_end(logs)
