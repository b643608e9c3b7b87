"""Record streams numbered by sample: ``(index, serialized record)`` pairs for decoders whose random draws
are seeded by (seed, index), so a sample gets the same draws in every run and a resumed run continues
exactly where an uninterrupted one would be."""
from __future__ import annotations

import numpy as np


def indexed_batches(data_dir, decode, *, split: str, strategy: str, seed: int, batch_size: int,
                    start_step: int = 0, shuffle_budget: int = 512):
    """Infinite training batches: records chosen by ``strategy`` (:mod:`mammodg.sampling.streams`), numbered
    from ``start_step * batch_size``, mapped by ``decode(index, record)``."""
    import tensorflow as tf

    from mammodg.records.reader import load_index
    from mammodg.sampling.streams import make_plan, serialized_stream

    sampler = make_plan(load_index(data_dir), data_dir, split, strategy, seed)
    start = start_step * batch_size
    ds = serialized_stream(sampler, seed=seed, start=start, shuffle_budget=shuffle_budget)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, np.iinfo(np.int64).max), ds)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def indexed_split(data_dir, decode, *, split: str, first_index: int = 10**12):
    """Every record of a split once, in shard order, numbered from ``first_index`` (apart from training
    indices) and mapped by ``decode(index, record)``: the same draws at every validation. Returns
    (dataset, number of records)."""
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index

    index = load_index(data_dir)
    files = sorted(all_shards(index, data_dir, split))
    count = sum(e["count"] for seg in index["splits"][split].values() for e in seg.values())
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(first_index, first_index + count), tf.data.TFRecordDataset(files))
    return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), count
