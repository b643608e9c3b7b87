"""Check shards against ``dataset.json``: each shard's size, record count and (in full) SHA-256.

TFRecord framing (tensorflow/core/lib/io/record_writer.cc): each record is a little-endian uint64
length, a 4-byte CRC of it, the data and a 4-byte CRC of the data. Counting records walks the headers
only, so the quick check reads 12 bytes a record and is cheap enough to run before every training.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from mammodg.records.reader import DatasetError, load_index


class ShardError(DatasetError):
    """A shard is missing, truncated or differs from what ``dataset.json`` lists; the message names it."""


def count_records(path: str | Path) -> int:
    """Records in a TFRecord file, from its length headers; ShardError when the framing does not end on the file's end."""
    path = Path(path)
    size = path.stat().st_size
    n, pos = 0, 0
    with open(path, "rb") as f:
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise ShardError(f"shard {path}: truncated inside the header of record {n + 1}")
            (length,) = struct.unpack("<Q", head[:8])
            pos += 12 + length + 4
            if pos > size:
                raise ShardError(f"shard {path}: record {n + 1} claims {length} bytes, past the end of the file (truncated or corrupted)")
            f.seek(pos)
            n += 1
    return n


def shard_digest(path: str | Path) -> tuple[int, str, int]:
    """(record count, SHA-256 hex, size in bytes) of a shard as it is on disk."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return count_records(path), h.hexdigest(), Path(path).stat().st_size


def verify(data_dir: str | Path, quick: bool = True) -> dict:
    """Check every shard ``dataset.json`` lists; returns {"shards": n, "records": n}.

    ``quick``: existence, size and record count (12 bytes read a record); otherwise also the SHA-256
    of every byte. Raises ShardError naming the first bad shard, or DatasetError for the index itself.
    """
    data_dir = Path(data_dir)
    index = load_index(data_dir)
    shards = records = 0
    for split, segs in sorted(index["splits"].items()):
        for segment, labels in sorted(segs.items()):
            for label, entry in sorted(labels.items()):
                for s in entry["shards"]:
                    path = data_dir / s["path"]
                    if not path.is_file():
                        raise ShardError(f"shard {path} listed in dataset.json is missing; rebuild the dataset")
                    size = path.stat().st_size
                    if "bytes" in s and size != s["bytes"]:
                        raise ShardError(f"shard {path}: {size} bytes, dataset.json lists {s['bytes']} (truncated or changed); rebuild the dataset")
                    count = count_records(path)
                    if count != s["count"]:
                        raise ShardError(f"shard {path}: {count} records, dataset.json lists {s['count']}; rebuild the dataset")
                    if not quick and "sha256" in s:
                        if shard_digest(path)[1] != s["sha256"]:
                            raise ShardError(f"shard {path}: SHA-256 differs from dataset.json (corrupted or changed); rebuild the dataset")
                    shards += 1
                    records += count
    if records != index.get("records", records):
        raise ShardError(f"{data_dir / 'dataset.json'}: shards hold {records} records, the index says {index['records']}")
    return {"shards": shards, "records": records}
