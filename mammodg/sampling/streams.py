"""Batches in tf.data by sampling strategy (periodic-sampling paper, Algorithm 2, and its baselines).

Every stream shuffles *serialized* records in a small buffer and repeats forever; a precomputed choice
sequence says which stream gives the next sample, and decoding happens after the choice, so memory
does not grow with the number of segments times the image size (the shuffle budget is shared among
streams). A (data segment, label) stream reads its own shards one after another (file order
reshuffled each pass). A pooled stream (``balanced_labels``, ``natural``) reads all its (segment,
label) streams at once, as a random merge (:func:`_pooled`), so that its batches mix segments in
proportion to their sizes whatever the shard size and shuffle budget (reading the pool's shards one
after another gave batches mostly from one segment once a segment outgrew the buffer).

Strategies (``strategy`` in the stage config):

- ``periodic``: Algorithm 1's pattern over segments, weights ``n_min``; labels alternate within each
  segment, starting at a seeded random label (Algorithm 2's ``Y``).
- ``balanced_segments`` ("Bal. segments"): the same with every segment weighted equally.
- ``balanced_labels`` ("Bal. labels"): labels alternate 0, 1, segments ignored (one pooled stream per
  label).
- ``natural``: one pooled, shuffled stream of everything.

Reading: a stream whose records all fit its share of the shuffle budget reads its shards once and then
serves them from memory (``cache``: the same records its shuffle buffer holds anyway), instead of reopening
its files every pass (a one-record stream reopened a file per sample: ~10% more CPU than a plain reader);
the chosen records are read ahead (:data:`READ_AHEAD`) in their own thread, off the decoding map's path.

The choice sequence is periodic (period 2 x pattern length, since a segment visited an odd number of
times per pattern starts the next pass on the other label); ``start`` skips into it exactly, which is
how a resumed run continues the same proportions and label alternation.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from mammodg.records.reader import DatasetError, load_index, streams
from mammodg.sampling.pattern import sampling_pattern

STRATEGIES = ("periodic", "balanced_segments", "balanced_labels", "natural")


@dataclasses.dataclass
class Plan:
    """What a strategy samples: stream keys and one period of the choice sequence."""

    keys: list  # stream keys: (segment, label) | ("*", label) | ("*", "*")
    files: list[list[str]]
    counts: list[int]
    choices: np.ndarray  # int32 indices into ``keys``, one period
    members: list[list[tuple[list[str], int]]] | None = None  # pooled keys: (shards, records) per member stream

    def proportions(self) -> dict:
        """Share of each stream key over one period (what the run trains on)."""
        c = np.bincount(self.choices, minlength=len(self.keys)) / len(self.choices)
        return {f"{k[0]}|label{k[1]}": float(v) for k, v in zip(self.keys, c)}


def _alternating(seg_seq: np.ndarray, n_segments: int, seed: int) -> np.ndarray:
    """Labels for a sequence of segment visits: each segment alternates, from a seeded random start."""
    start = np.random.default_rng(seed).integers(0, 2, n_segments)
    visit = np.zeros_like(seg_seq)
    order = np.argsort(seg_seq, kind="stable")
    counts = np.bincount(seg_seq, minlength=n_segments)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    visit[order] = np.arange(len(seg_seq)) - np.repeat(first, counts)
    return (start[seg_seq] + visit) % 2


def make_plan(index: dict, data_dir: str | Path, split: str, strategy: str, seed: int = 0) -> Plan:
    if strategy not in STRATEGIES:
        raise ValueError(f"sampling strategy must be one of {STRATEGIES}, got {strategy!r}")
    by_key = streams(index, data_dir, split)
    if not by_key:
        raise DatasetError(f"split {split!r} of {data_dir} has no records")
    segments = sorted({s for s, _ in by_key})
    if strategy in ("periodic", "balanced_segments"):
        missing = [f"{s} (no label {lab})" for s in segments for lab in (0, 1) if (s, lab) not in by_key]
        if missing:
            raise DatasetError(
                f"{strategy} sampling needs both labels in every data segment of split {split!r}; missing: "
                f"{', '.join(missing)}. Merge or drop these segments (segment_keys), or use balanced_labels.")
        keys = [(s, lab) for s in segments for lab in (0, 1)]
        n_min = [min(by_key[(s, 0)][1], by_key[(s, 1)][1]) for s in segments]
        weights = n_min if strategy == "periodic" else [1] * len(segments)
        pattern = sampling_pattern(weights)
        seg_seq = np.tile(pattern, 2)
        labels = _alternating(seg_seq, len(segments), seed)
        choices = (seg_seq * 2 + labels).astype(np.int32)
        return Plan(keys, [by_key[k][0] for k in keys], [by_key[k][1] for k in keys], choices)
    if strategy == "balanced_labels":
        keys = [("*", 0), ("*", 1)]
        for lab in (0, 1):
            if not any(k[1] == lab for k in by_key):
                raise DatasetError(f"balanced_labels sampling: split {split!r} has no image with label {lab}")
        start = int(np.random.default_rng(seed).integers(0, 2))
        choices = np.array([start, 1 - start], np.int32)
    else:
        keys = [("*", "*")]
        choices = np.zeros(1, np.int32)
    members = [[by_key[k] for k in sorted(by_key) if key[1] in ("*", k[1])] for key in keys]
    return Plan(keys, [[p for files, _ in pool for p in files] for pool in members],
                [sum(c for _, c in pool) for pool in members], choices, members=members)


READ_AHEAD = 8  # serialized records read ahead of the decoding map (a few MB of full-size images)


def _stream(files: list[str], count: int, buffer: int, seed: int):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(files)
    if len(files) > 1:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.flat_map(tf.data.TFRecordDataset)
    if count <= buffer:  # the buffer holds the whole stream anyway: read the files once (each pass still reshuffled)
        ds = ds.cache()
    ds = ds.shuffle(max(1, min(count, buffer)), seed=seed + 1, reshuffle_each_iteration=True)
    return ds.repeat()


def _pooled(members: list[tuple[list[str], int]], buffer: int, seed: int):
    """A pool's records: every pass a uniformly random merge of its member (segment, label) streams.

    Each pass takes the next record from a member with probability proportional to the member's unread
    records (a random permutation of the member ids, each repeated by its record count), so every
    stretch of the pass mixes segments in proportion to their sizes, whatever the shard sizes. Each member
    reads its shards one after another in a new order; the shuffle buffer of serialized records then
    breaks up the writer's order inside a shard. The merge and file orders are seeded by (seed, pass):
    deterministic, new at each pass, and each pass sees every record once.
    """
    import tensorflow as tf

    owner = tf.constant(np.repeat(np.arange(len(members), dtype=np.int64), [c for _, c in members]))
    buffer = max(1, min(sum(c for _, c in members), buffer))

    def one_pass(p):
        def shuffled(values, salt):
            pass_seed = tf.stack([tf.constant(seed + salt, tf.int64), p])
            return tf.random.experimental.stateless_shuffle(values, seed=pass_seed)

        order = shuffled(owner, 0)
        readers = [tf.data.TFRecordDataset(shuffled(tf.constant(f), i + 1)) for i, (f, _) in enumerate(members)]
        merged = tf.data.Dataset.choose_from_datasets(readers, tf.data.Dataset.from_tensor_slices(order))
        return merged.shuffle(buffer, seed=seed)  # a Python seed: tensor seeds fail once a global seed is set

    return tf.data.Dataset.range(np.iinfo(np.int64).max).flat_map(one_pass)


def serialized_stream(plan: Plan, *, seed: int = 0, start: int = 0, shuffle_budget: int = 512):
    """Infinite dataset of serialized records in plan order, beginning at sample ``start``.

    ``start`` continues the choice sequence exactly (proportions, label alternation); the order inside
    each stream is a new shuffle (its seed includes ``start``).
    """
    import tensorflow as tf

    per_stream = max(2, shuffle_budget // len(plan.keys))
    seeds = [seed * 1000 + 17 * i + start for i in range(len(plan.keys))]
    if plan.members is not None:
        inputs = [_pooled(m, per_stream, s) for m, s in zip(plan.members, seeds)]
    else:
        inputs = [_stream(f, c, per_stream, s) for f, c, s in zip(plan.files, plan.counts, seeds)]
    if len(inputs) == 1:
        return inputs[0].prefetch(READ_AHEAD)
    table = tf.constant(plan.choices, tf.int64)
    period = len(plan.choices)
    choice = tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(lambda i: tf.gather(table, i % period))
    return tf.data.Dataset.choose_from_datasets(inputs, choice).prefetch(READ_AHEAD)


def image_batches(data_dir, split: str, *, strategy: str, batch_size: int, seed: int = 0, start_step: int = 0,
                  target_mean: float = 0.25, decode=None, shuffle_budget: int = 512):
    """Batches ``(image float32 (b, h, w, 1), label int32 (b,))`` for training, infinite.

    ``decode`` (optional) maps a parsed record dict to ``(x, y)`` instead of the whole-image default.
    Returns ``(dataset, plan)``.
    """
    import tensorflow as tf

    from mammodg.records.schema import model_input, parse

    index = load_index(data_dir)
    plan = make_plan(index, data_dir, split, strategy, seed)
    ds = serialized_stream(plan, seed=seed, start=start_step * batch_size, shuffle_budget=shuffle_budget)

    def whole_image(raw):
        r = parse(raw)
        return model_input(r["image"], target_mean), tf.cast(r["label"], tf.int32)

    ds = ds.map(decode or whole_image, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds, plan


def evaluation_records(data_dir, split: str, *, target_mean: float = 0.25, batch_size: int = 8):
    """Every record of a split once, batched: (image, label, data_segment) for evaluation."""
    import tensorflow as tf

    from mammodg.records.reader import all_shards
    from mammodg.records.schema import model_input, parse

    index = load_index(data_dir)
    files = sorted(all_shards(index, data_dir, split))

    def decode(raw):
        r = parse(raw)
        return model_input(r["image"], target_mean), tf.cast(r["label"], tf.int32), r["data_segment"]

    ds = tf.data.TFRecordDataset(files).map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
