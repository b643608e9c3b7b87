"""``mammodg build-tfrecords``: manifest -> per-split, per-segment, per-label TFRecord shards + index.

Two phases, both restartable:

1. *process* (all cores, :mod:`mammodg.records.rows`): each manifest row is read, preprocessed and
   encoded into a serialized ``tf.train.Example``, written to ``<out>/_cache/<key>.rec``; then
   ``<key>.json`` (its metadata or its rejection reason) is written, atomically, and marks the row done.
   A re-run skips done rows; the key hashes everything the output depends on, so a changed config or
   file is processed again.
2. *assemble* (here and :mod:`mammodg.records.shards`): records are grouped by (split, data segment,
   label), ordered by manifest line, and written into shards through temporary names renamed into place,
   each counted and hashed from disk; ``rejects.csv`` (line, reason, detail: never a path or a cell
   value), ``provenance.csv`` (image id -> manifest line and path, mode 0600) and, last, ``dataset.json``
   are written (:mod:`mammodg.records.csvfiles`).

A killed build re-run therefore ends with exactly the shards of an uninterrupted one, and a shard
never exists under its final name unless complete.
"""
from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path

from mammodg.config import BuildConfig, ConfigError, to_dict
from mammodg.io.atomic import atomic_write_json
from mammodg.io.manifest import read_manifest
from mammodg.records.csvfiles import write_csv
from mammodg.records.reader import INDEX_FORMAT, INDEX_NAME
from mammodg.records.rows import is_done, plan_rows, rejection, run_local
from mammodg.records.schema import encode_png16  # noqa: F401  (re-exported: the record image encoding)
from mammodg.records.shards import BuildError, write_shards
from mammodg.records.split import load_or_create_salt

REJECTS_NAME = "rejects.csv"
PROVENANCE_NAME = "provenance.csv"
LOCK_NAME = ".build.lock"
CACHE_DIR = "_cache"
EXIT_OK, EXIT_REJECTED, EXIT_ERROR = 0, 1, 2
# Manifest fields a data segment can be made of (``BuildConfig.segment_keys``).
SEGMENT_COLUMNS = ("source", "manufacturer", "view", "laterality", "density", "birads", "label")
__all__ = ["INDEX_NAME", "REJECTS_NAME", "PROVENANCE_NAME", "EXIT_OK", "EXIT_REJECTED", "EXIT_ERROR",
           "BuildError", "check_config", "build", "format_summary"]


def check_config(cfg: BuildConfig) -> None:
    """Refuse values that would fail late or silently (one line naming the field)."""
    if cfg.shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {cfg.shard_size}")
    if cfg.workers < 0:
        raise ConfigError(f"workers must be 0 (all cores) or more, got {cfg.workers}")
    if not 0 <= cfg.png_compress_level <= 9:
        raise ConfigError(f"png_compress_level must be 0-9, got {cfg.png_compress_level}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    bad = [k for k in cfg.segment_keys if k not in SEGMENT_COLUMNS]
    if bad or not cfg.segment_keys:
        raise ConfigError(f"segment_keys: {bad or '(empty)'} not manifest column(s); choose from {list(SEGMENT_COLUMNS)}")


class BuildLock:
    """An exclusive lock on ``<out>/.build.lock``: a second build into the same folder stops at once."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME

    def __enter__(self):
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.close()
            raise BuildError(f"another build is writing to {self.path.parent} (it holds {self.path}); "
                             f"wait for it to finish or choose another --out") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _duplicate_pixels(ok: list[dict]) -> dict[int, dict]:
    """Rejections for identical pixel data on several rows: every copy when the copies disagree on the
    patient or the label (which one is right cannot be known, and they would leak across splits),
    else every copy after the first."""
    by_hash = collections.defaultdict(list)
    for m in ok:
        by_hash[m["pixel_sha256"]].append(m)
    out = {}
    for ms in by_hash.values():
        if len(ms) < 2:
            continue
        ms.sort(key=lambda m: m["line"])
        lines = ", ".join(str(m["line"]) for m in ms)
        if len({(m["patient"], m["label"]) for m in ms}) > 1:
            for m in ms:
                out[m["line"]] = rejection(m["line"], "duplicate_pixels_conflict", f"line {m['line']}: the same pixel data is on lines "
                                           f"{lines} under different patients or labels; all copies rejected")
        else:
            for m in ms[1:]:
                out[m["line"]] = rejection(m["line"], "duplicate_pixels", f"line {m['line']}: the same pixel data as line {ms[0]['line']} (same patient and label)")
    return out


def build(manifest: str | Path, out: str | Path, cfg: BuildConfig | None = None, *, progress: bool = True,
          root: str | Path | None = None, run_tasks=None) -> dict:
    """Build shards, ``dataset.json``, ``rejects.csv`` and ``provenance.csv``; returns the index.

    ``root``: when given, manifest image paths resolving outside it are rejected. ``run_tasks(tasks,
    workers, progress)`` runs :func:`~mammodg.records.rows.process_row` on every task not yet cached: the
    local process pool (:func:`~mammodg.records.rows.run_local`) when None, or Apache Beam
    (:func:`mammodg.records.beam.beam_runner`); assembly stays here.
    """
    cfg = cfg or BuildConfig()
    check_config(cfg)
    out = Path(out)
    rows, bad, ignored = read_manifest(manifest, root=root)
    out.mkdir(parents=True, exist_ok=True)
    with BuildLock(out):
        return _build(rows, bad, ignored, out, cfg, progress, run_tasks or run_local)


def _build(rows, bad, ignored, out: Path, cfg: BuildConfig, progress: bool, run_tasks) -> dict:
    cache = out / CACHE_DIR
    cache.mkdir(exist_ok=True)
    salt = load_or_create_salt(out, cfg.pseudonym_salt)
    tasks, rejected = plan_rows(rows, cfg, salt, cache)
    todo = [t for t in tasks if not is_done(t)]
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    run_tasks(todo, min(workers, max(1, len(todo))), progress)
    t1 = time.perf_counter()

    metas = [json.loads((cache / f"{t.key}.json").read_text()) for t in tasks]
    ok = [m for m in metas if m["status"] == "ok"]
    dup = _duplicate_pixels(ok)
    ok = [m for m in ok if m["line"] not in dup]
    rejected += [dataclasses.asdict(b) for b in bad] + list(dup.values()) + [
        rejection(m["line"], m["reason"], m["detail"]) for m in metas if m["status"] != "ok"]
    rejected.sort(key=lambda r: r["line"])
    splits = write_shards(out, ok, lambda m: (cache / f"{m['key']}.rec").read_bytes(), cfg.shard_size)
    t2 = time.perf_counter()

    write_csv(out / REJECTS_NAME, ["line", "reason", "detail"], rejected)
    path_of = {t.key: str(t.row.image_path) for t in tasks}
    write_csv(out / PROVENANCE_NAME, ["image_id", "manifest_line", "image_path"],
              [{"image_id": m["image_id"], "manifest_line": m["line"], "image_path": path_of[m["key"]]} for m in ok], private=True)
    warnings = [{"line": m["line"], "warning": w} for m in ok for w in m.get("warnings", [])]
    produced = collections.Counter((m["segment"], m["label"]) for m in ok)
    index = {
        "format": INDEX_FORMAT,
        "manifest_rows": len(rows) + len(bad),
        "records": len(ok),
        "rejected": len(rejected),
        "rejected_by_reason": dict(collections.Counter(r["reason"] for r in rejected)),
        "ignored_columns": ignored,
        "warnings": warnings,
        "segment_keys": cfg.segment_keys,
        "segments": sorted({s for s, _ in produced}),
        "image_shape": [cfg.preprocess.height, cfg.preprocess.width],
        "config": to_dict(cfg) | {"pseudonym_salt": "(not stored)"},
        "splits": splits,
        "timing": {"processed": len(todo), "workers": workers, "process_s": round(t1 - t0, 3), "assemble_s": round(t2 - t1, 3)},
    }
    atomic_write_json(out / INDEX_NAME, index)
    if not cfg.keep_cache:
        for p in cache.iterdir():
            p.unlink()
        cache.rmdir()
    return index


def format_summary(index: dict) -> str:
    """Per split, per data segment, per label counts of a dataset index, as a text table."""
    lines = [f"{'split':<6} {'data segment':<34} {'benign (0)':>10} {'malignant (1)':>13}"]
    total = collections.Counter()
    for split, segs in index["splits"].items():
        for seg, labels in segs.items():
            b = labels.get("0", {}).get("count", 0)
            m = labels.get("1", {}).get("count", 0)
            total[split, 0] += b
            total[split, 1] += m
            lines.append(f"{split:<6} {seg:<34} {b:>10} {m:>13}")
    for split in index["splits"]:
        lines.append(f"{split:<6} {'(all)':<34} {total[split, 0]:>10} {total[split, 1]:>13}")
    lines.append(f"records written: {index['records']}   rejected: {index['rejected']} {index['rejected_by_reason'] or ''}")
    return "\n".join(lines)
