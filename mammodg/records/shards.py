"""Shard assembly: serialized records grouped by (split, data segment, label) into TFRecord shards,
each written under a temporary name, renamed into place, then counted and hashed from disk."""
from __future__ import annotations

import collections
import hashlib
import json
import re
from pathlib import Path

from mammodg.io.atomic import atomic_path
from mammodg.records.reader import INDEX_NAME


class BuildError(ValueError):
    """The build cannot go on or its output is inconsistent; one line, exit status 2."""


def segment_slug(segment: str) -> str:
    """Folder of a data segment: readable slug plus a short hash of the exact name, so that names
    differing only in characters the slug drops ("S 1", "S/1", "S_1") never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", segment).strip("_")[:64] or "segment"
    return f"{slug}-{hashlib.sha256(segment.encode()).hexdigest()[:8]}"


def _previous_shards(out: Path) -> set[Path]:
    """Shards an earlier ``dataset.json`` in ``out`` lists: the only files a build may delete."""
    try:
        splits = json.loads((out / INDEX_NAME).read_text())["splits"]
        paths = {out / s["path"] for segs in splits.values() for labels in segs.values()
                 for e in labels.values() for s in e["shards"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    root = out.resolve()
    return {p for p in paths if p.suffix == ".tfrecord" and p.resolve().is_relative_to(root)}


def _check_on_disk(out: Path, index: dict, expected: int) -> None:
    """Count and hash every shard of ``index`` from disk (adding ``bytes`` and ``sha256``); BuildError
    when a shard or the whole does not hold exactly the records written to it."""
    from mammodg.records.verify import shard_digest

    on_disk = 0
    for segs in index.values():
        for labels in segs.values():
            for e in labels.values():
                for s in e["shards"]:
                    count, digest, size = shard_digest(out / s["path"])
                    if count != s["count"]:
                        raise BuildError(f"shard {s['path']} holds {count} records, {s['count']} were written to it")
                    s.update(bytes=size, sha256=digest)
                    on_disk += count
    if on_disk != expected:
        raise BuildError(f"the shards hold {on_disk} records but {expected} were indexed")


def write_shards(out: Path, metas: list[dict], read, shard_size: int) -> dict:
    """Group records by (split, segment, label), write shards atomically, return the ``splits`` index.

    ``metas`` need ``split``, ``segment``, ``label``, ``patient`` and ``line`` (the order inside a shard);
    ``read(meta)`` returns the serialized record. Each shard is listed with its record count, size and
    SHA-256, counted and hashed from disk: a build whose shards do not hold exactly the records it
    indexed raises BuildError. Shards an earlier ``dataset.json`` listed and this build did not rewrite
    are removed; no other file is.
    """
    import tensorflow as tf

    previous = _previous_shards(out)
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for m in metas:
        groups[(m["split"], m["segment"], m["label"])].append(m)
    index: dict = {}
    written: set[Path] = set()
    for (split, segment, label), ms in sorted(groups.items()):
        ms.sort(key=lambda m: m["line"])
        n_shards = -(-len(ms) // shard_size)
        folder = out / split / segment_slug(segment)
        folder.mkdir(parents=True, exist_ok=True)
        shards = []
        for i in range(n_shards):
            part = ms[i * shard_size:(i + 1) * shard_size]
            path = folder / f"label{label}-{i:05d}-of-{n_shards:05d}.tfrecord"
            if path in written:
                raise BuildError(f"two groups of records map to shard {path.relative_to(out)}")
            with atomic_path(path) as tmp, tf.io.TFRecordWriter(str(tmp)) as w:
                for m in part:
                    w.write(read(m))
            written.add(path)
            shards.append({"path": str(path.relative_to(out)), "count": len(part)})
        entry = index.setdefault(split, {}).setdefault(segment, {})
        entry[str(label)] = {"count": len(ms), "patients": len({m["patient"] for m in ms}), "shards": shards}
    _check_on_disk(out, index, len(metas))
    for old in previous - written:  # shards of an earlier build that this one does not have
        old.unlink(missing_ok=True)
    return index
