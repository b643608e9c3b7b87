"""Record streams numbered by sample: ``(index, serialized record)`` pairs for decoders whose random draws
are seeded by (seed, index), so a sample gets the same draws in every run and a resumed run continues
exactly where an uninterrupted one would be."""
from __future__ import annotations

import numpy as np


def indexed_batches(data_dir, decode, *, split: str, strategy: str, seed: int, batch_size: int,
                    start_step: int = 0, shuffle_budget: int = 512, label_fraction: float = 1.0):
    """Infinite training batches: records chosen by ``strategy`` (:mod:`mammodg.sampling.streams`) among the
    patients ``label_fraction`` keeps (:func:`mammodg.sampling.label_fraction.filter_records`), numbered
    from ``start_step * batch_size``, mapped by ``decode(index, record)``."""
    import tensorflow as tf

    from mammodg.records.reader import load_index
    from mammodg.sampling.label_fraction import filter_records
    from mammodg.sampling.streams import make_plan, serialized_stream

    sampler = make_plan(load_index(data_dir), data_dir, split, strategy, seed)
    start = start_step * batch_size
    ds = filter_records(serialized_stream(sampler, seed=seed, start=start, shuffle_budget=shuffle_budget), label_fraction)
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


# ------------------------------------------------------------------ patch samples (periodic-sampling A.3)
def _patch_pairs(raw, cls=None):
    """Dataset of the (serialized record, lesion index) patch samples of one record
    (:mod:`mammodg.augment.patches`): a healthy sample (index -1) when labelled 0, one per box; only those
    of class ``cls`` when given. The image is not decoded."""
    import tensorflow as tf

    from mammodg.augment.patches import HEALTHY, lesion_classes
    from mammodg.records.schema import FIELDS, parse_fields

    r = parse_fields(raw, {k: FIELDS[k] for k in ("label", "boxes/lesion_class")})
    k = tf.range(tf.shape(r["boxes/lesion_class"])[0])
    classes = lesion_classes(r["boxes/lesion_class"])
    healthy = tf.cast(tf.equal(r["label"], 0), tf.int32)
    k = tf.concat([tf.fill([healthy], HEALTHY), k], 0)
    classes = tf.concat([tf.zeros([healthy], tf.int32), classes], 0)
    if cls is not None:
        k = tf.boolean_mask(k, tf.equal(classes, cls))
    return tf.data.Dataset.from_tensor_slices(k).map(lambda i: (raw, i))


def patch_census(data_dir, split: str) -> dict:
    """Patch samples of a split, read once from its shards (labels and box classes, no image decoded):
    ``counts`` per class (:data:`mammodg.augment.patches.PATCH_CLASSES`), ``files`` per class (the shards
    holding one), and ``unboxed_malignant``, the label-1 records without boxes (classifier only)."""
    import tensorflow as tf

    from mammodg.augment.patches import PATCH_CLASSES, lesion_classes
    from mammodg.records.reader import all_shards, load_index
    from mammodg.records.schema import FIELDS, feature_spec

    spec = feature_spec({k: FIELDS[k] for k in ("label", "boxes/lesion_class")})
    counts, files, unboxed = np.zeros(len(PATCH_CLASSES), np.int64), [[] for _ in PATCH_CLASSES], 0
    for path in sorted(all_shards(load_index(data_dir), data_dir, split)):
        here = np.zeros(len(PATCH_CLASSES), np.int64)
        for raw in tf.data.TFRecordDataset(path).batch(64):
            ex = tf.io.parse_example(raw, spec)
            labels = ex["label"].numpy()
            names = ex["boxes/lesion_class"]
            n_boxes = np.bincount(names.indices[:, 0].numpy(), minlength=len(labels))
            here[0] += int((labels == 0).sum())
            here += np.bincount(lesion_classes(names.values).numpy(), minlength=len(PATCH_CLASSES))
            unboxed += int(((labels == 1) & (n_boxes == 0)).sum())
        counts += here
        for c in np.flatnonzero(here):
            files[c].append(path)
    return {"counts": {name: int(n) for name, n in zip(PATCH_CLASSES, counts)}, "files": files,
            "unboxed_malignant": unboxed}


def _class_stream(files: list[str], cls: int, buffer: int, seed: int):
    """Infinite, shuffled (record, lesion index) samples of one patch class: every shard holding the class
    read at once (one record from each in turn, shard order reshuffled each pass), then a shuffle buffer."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=len(files), block_length=1)
    ds = ds.flat_map(lambda raw: _patch_pairs(raw, cls))
    return ds.shuffle(buffer, seed=seed + 1, reshuffle_each_iteration=True).repeat()


def class_choices(n_classes: int, seed: int, start: int = 0):
    """Infinite dataset of stream ids taking the classes in turn from a seeded first one, beginning at sample
    ``start``: any ``batch`` consecutive samples hold each class floor or ceil of batch / n_classes times,
    and a run resumed at ``start`` continues the same sequence."""
    import tensorflow as tf

    first = int(np.random.default_rng(seed).integers(0, n_classes))
    return tf.data.Dataset.range(start, np.iinfo(np.int64).max).map(lambda i: (i + first) % n_classes)


def patch_batches(data_dir, decode, *, split: str, seed: int, batch_size: int, start_step: int = 0,
                  shuffle_budget: int = 512, census: dict | None = None):
    """Infinite training batches balanced over the patch classes: one stream per class present in the split
    (:func:`_class_stream`), taken in turn by :func:`class_choices`; samples numbered from
    ``start_step * batch_size`` and mapped by ``decode(index, record, lesion index)``. A class without
    samples is left out (balance over the others); none at all is a DatasetError. Returns (dataset, census)."""
    import tensorflow as tf

    from mammodg.records.reader import DatasetError

    census = census or patch_census(data_dir, split)
    present = [c for c, files in enumerate(census["files"]) if files]
    if not present:
        raise DatasetError(f"split {split!r} of {data_dir} has no patch sample: no label-0 image and no lesion box")
    start = start_step * batch_size
    buffer = max(2, shuffle_budget // len(present))
    streams = [_class_stream(census["files"][c], c, buffer, seed * 1000 + 17 * c + start) for c in present]
    ds = tf.data.Dataset.choose_from_datasets(streams, class_choices(len(present), seed, start))
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(start, np.iinfo(np.int64).max), ds)
    ds = ds.map(lambda i, s: decode(i, *s), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE), census


def patch_split(data_dir, decode, *, split: str, first_index: int = 10**12):
    """Every patch sample of a split once, in shard and box order, numbered from ``first_index`` and mapped
    by ``decode(index, record, lesion index)``: a fixed set, the same draws at every validation."""
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index

    files = sorted(all_shards(load_index(data_dir), data_dir, split))
    ds = tf.data.TFRecordDataset(files).flat_map(_patch_pairs)
    ds = tf.data.Dataset.zip(tf.data.Dataset.range(first_index, np.iinfo(np.int64).max), ds)
    return ds.map(lambda i, s: decode(i, *s), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
