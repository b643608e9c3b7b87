"""Read what the builder wrote: the ``dataset.json`` index and the shards it lists."""
from __future__ import annotations

import json
from pathlib import Path

INDEX_NAME = "dataset.json"  # the index of a built dataset, beside its shards
INDEX_FORMAT = "mammodg-tfrecords/1"  # its "format" value; a reader refuses any other


class DatasetError(ValueError):
    """The dataset folder or index is missing or inconsistent; the message names the file."""


def load_index(data_dir: str | Path) -> dict:
    path = Path(data_dir) / INDEX_NAME
    if not path.is_file():
        raise DatasetError(f"{path} not found: build the shards first (mammodg build-tfrecords --manifest M --out {data_dir})")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e}); rebuild the dataset") from None
    if index.get("format") != INDEX_FORMAT:
        raise DatasetError(f"{path}: unknown format {index.get('format')!r}")
    return index


def streams(index: dict, data_dir: str | Path, split: str) -> dict[tuple[str, int], tuple[list[str], int]]:
    """(data segment, label) -> (shard paths, record count) for one split."""
    if split not in index["splits"]:
        raise DatasetError(f"split {split!r} not in {Path(data_dir) / INDEX_NAME}; it has {sorted(index['splits'])}")
    out = {}
    for segment, labels in index["splits"][split].items():
        for label, entry in labels.items():
            paths = [str(Path(data_dir) / s["path"]) for s in entry["shards"]]
            for p in paths:
                if not Path(p).is_file():
                    raise DatasetError(f"shard {p} listed in {INDEX_NAME} is missing; rebuild the dataset")
            out[(segment, int(label))] = (paths, entry["count"])
    return out


def all_shards(index: dict, data_dir: str | Path, split: str) -> list[str]:
    return [p for paths, _ in streams(index, data_dir, split).values() for p in paths]
