"""``mammodg build-tfrecords``: manifest -> per-split, per-segment, per-label TFRecord shards + index.

Two phases, both restartable:

1. *process* (all cores): each manifest row is read, preprocessed and encoded into a serialized
   ``tf.train.Example``, written to ``<out>/_cache/<key>.rec``; then ``<key>.json`` (its metadata or its
   rejection reason) is written, atomically, and marks the row done. A re-run skips done rows; the key
   hashes everything the output depends on, so a changed config or file is processed again.
2. *assemble*: records are grouped by (split, data segment, label), ordered by manifest line, and
   written into shards through temporary names renamed into place, each counted and hashed from disk;
   ``rejects.csv`` (line, reason, detail: never a path or a cell value), ``provenance.csv`` (image id ->
   manifest line and path, mode 0600) and, last, ``dataset.json`` are written.

A killed build re-run therefore ends with exactly the shards of an uninterrupted one, and a shard
never exists under its final name unless complete.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import time
import traceback
from pathlib import Path

import numpy as np

from mammodg.config import BuildConfig, ConfigError, to_dict
from mammodg.io.manifest import Row, read_manifest
from mammodg.records.schema import encode_example
from mammodg.records.split import create_private, image_id, load_or_create_salt, pseudonym, split_patients

INDEX_NAME = "dataset.json"
REJECTS_NAME = "rejects.csv"
PROVENANCE_NAME = "provenance.csv"
LOCK_NAME = ".build.lock"
CACHE_DIR = "_cache"
EXIT_OK, EXIT_REJECTED, EXIT_ERROR = 0, 1, 2
# Manifest fields a data segment can be made of (``BuildConfig.segment_keys``).
SEGMENT_COLUMNS = ("source", "manufacturer", "view", "laterality", "density", "birads", "label")


class BuildError(ValueError):
    """The build cannot go on or its output is inconsistent; one line, exit status 2."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def csv_cell(value) -> str:
    """A CSV cell that a spreadsheet will not run as a formula (CSV injection): a leading = + - @ tab or CR gets a '."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(path: Path, header: list[str], rows: list[dict], *, private: bool = False) -> None:
    """Write a CSV atomically with every cell neutralised; ``private`` creates it mode 0600 from the start."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([csv_cell(r[k]) for k in header] for r in rows)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    if private:
        create_private(tmp, buf.getvalue().encode())
    else:
        tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def encode_png16(image: np.ndarray, compress_level: int = 1) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint16)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def segment_slug(segment: str) -> str:
    """Folder of a data segment: readable slug plus a short hash of the exact name, so that names
    differing only in characters the slug drops ("S 1", "S/1", "S_1") never share a folder."""
    slug = re.sub(r"[^A-Za-z0-9.=-]+", "_", segment).strip("_")[:64] or "segment"
    return f"{slug}-{hashlib.sha256(segment.encode()).hexdigest()[:8]}"


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


@dataclasses.dataclass
class Task:
    row: Row
    key: str
    split: str
    patient: str
    image_id: str
    cache: Path
    cfg: dict  # BuildConfig as a dict (picklable, cheap)


def _segment_of(values: dict, keys: list[str]) -> str:
    return "|".join(str(values.get(k) or "UNKNOWN") for k in keys)


def _without_path(text: str, path: Path) -> str:
    """A rejection detail with the image's path removed (it goes to provenance.csv only)."""
    for p in sorted({str(path), os.path.realpath(path), path.name}, key=len, reverse=True):
        if len(p) > 3:
            text = text.replace(p, "<image_path>")
    return text


def process_row(task: Task) -> dict:
    """Read, preprocess and encode one row; writes its cache entry and returns its metadata.

    Never raises: every failure becomes a rejection with a reason, so one bad file cannot stop a build.
    """
    from mammodg.io.dicom import DicomRejected, read_dicom
    from mammodg.preprocess.breast import preprocess

    row, cfg = task.row, task.cfg
    pp = cfg["preprocess"]
    meta = {"key": task.key, "line": row.line}
    try:
        img = read_dicom(row.image_path, voi=pp["voi"], allow_non_mg=cfg["allow_non_mg"])
        if img.burned_in and cfg["reject_burned_in"]:
            raise DicomRejected("burned_in_annotation", "BurnedInAnnotation is YES (text drawn into the pixels) and reject_burned_in is set")
        rows0, cols0 = img.pixels.shape
        boxes = np.array([les.box for les in row.lesions], np.float32).reshape(-1, 4)
        if len(boxes) and (boxes[:, 2].max() > cols0 + 1 or boxes[:, 3].max() > rows0 + 1):
            raise DicomRejected("box_outside_image", f"line {row.line}: a lesion box lies outside the {cols0}x{rows0} image (boxes are in stored DICOM pixel coordinates)")
        res = preprocess(img.pixels, boxes, pixel_spacing_mm=img.pixel_spacing_mm, **pp)
        values = {
            "source": row.source, "manufacturer": row.manufacturer or img.manufacturer or "UNKNOWN",
            "view": row.view or img.view, "laterality": row.laterality or img.laterality,
            "density": row.density, "birads": row.birads, "label": row.label,
        }
        segment = _segment_of(values, cfg["segment_keys"])
        kept = [les for les, k in zip(row.lesions, res.box_kept) if k]
        feats = {
            "image": encode_png16(res.image, cfg["png_compress_level"]),
            "height": res.image.shape[0], "width": res.image.shape[1], "label": row.label,
            "data_segment": segment, "split": task.split, "source": values["source"],
            "manufacturer": values["manufacturer"], "view": values["view"], "laterality": values["laterality"],
            "patient": task.patient, "image_id": task.image_id, "birads": row.birads, "density": row.density,
            "pixel_spacing_mm": res.pixel_spacing_mm or 0.0, "scale": res.scale, "flipped": int(res.flipped),
            "mask_fallback": int(res.mask_fallback), "truncated": int(res.truncated),
            "breast_fraction": res.breast_fraction, "photometric": img.photometric,
            "transfer_syntax": img.transfer_syntax, "decoder": img.decoder, "voi": img.voi,
            "boxes/x_min": res.boxes[:, 0].tolist(), "boxes/y_min": res.boxes[:, 1].tolist(),
            "boxes/x_max": res.boxes[:, 2].tolist(), "boxes/y_max": res.boxes[:, 3].tolist(),
            "boxes/lesion_class": [les.lesion_class for les in kept], "boxes/birads": [les.birads for les in kept],
        }
        _atomic_write(task.cache / f"{task.key}.rec", encode_example(feats))
        warnings = []
        if res.mask_fallback:
            warnings.append("breast mask fell back to a plain threshold")
        if res.truncated:
            warnings.append("breast wider than the output: far side cropped")
        if not res.box_kept.all():
            warnings.append(f"{int((~res.box_kept).sum())} lesion box(es) fell outside the output image")
        if img.burned_in:
            warnings.append("BurnedInAnnotation is YES: text is drawn into the pixels")
        pixel_hash = hashlib.sha256(np.ascontiguousarray(img.pixels).tobytes() + str(img.pixels.shape).encode()).hexdigest()
        meta.update(status="ok", split=task.split, segment=segment, label=row.label, patient=task.patient,
                    image_id=task.image_id, manufacturer=values["manufacturer"], view=values["view"],
                    pixel_sha256=pixel_hash, warnings=warnings)
    except DicomRejected as e:
        meta.update(status="rejected", reason=e.reason, detail=_without_path(str(e), row.image_path))
    except Exception as e:  # an unexpected failure on one file must not stop the build
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        meta.update(status="rejected", reason="processing_error", detail=_without_path(tb, row.image_path))
    _atomic_write(task.cache / f"{task.key}.json", json.dumps(meta).encode())
    return meta


def _row_key(row: Row, salt: str, split: str, cfg: dict) -> str:
    try:
        st = os.stat(row.image_path)
        st = (st.st_size, st.st_mtime_ns)
    except OSError:
        st = None
    ident = json.dumps([dataclasses.asdict(row), str(row.image_path), st, salt, split, cfg["preprocess"],
                        cfg["segment_keys"], cfg["allow_non_mg"], cfg["reject_burned_in"], cfg["png_compress_level"]],
                       default=str, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def _reject(line: int, reason: str, detail: str) -> dict:
    return {"line": line, "reason": reason, "detail": detail}


def plan(rows: list[Row], cfg: BuildConfig, salt: str, cache: Path) -> tuple[list[Task], list[dict]]:
    """Pseudonyms, the split and the cache key of every row; returns (tasks, rejected rows).

    A patient's split is the manifest's ``split`` when any of its rows gives one (all its rows follow),
    else :func:`split_patients`. Rows of a patient the manifest puts in two splits are all rejected.
    """
    patient_of = {r.line: (r.source, pseudonym(salt, r.source, r.patient_id)) for r in rows}
    lines, malignant, given = collections.defaultdict(list), collections.defaultdict(int), collections.defaultdict(set)
    for r in rows:
        p = patient_of[r.line]
        lines[p].append(r.line)
        malignant[p] |= r.label
        if r.split:
            given[p].add(r.split)
    conflict = {p for p, s in given.items() if len(s) > 1}
    auto = split_patients({p: m for p, m in malignant.items() if p not in given}, cfg.val_fraction, cfg.seed)
    cfgd = to_dict(cfg)
    tasks, rejected = [], []
    for r in rows:
        p = patient_of[r.line]
        if p in conflict:
            rejected.append(_reject(r.line, "split_conflict", f"line {r.line}: the manifest's split column puts this patient in "
                                    f"{' and '.join(sorted(given[p]))} (its lines: {', '.join(map(str, lines[p]))})"))
            continue
        s = next(iter(given[p])) if p in given else auto[p]
        tasks.append(Task(r, _row_key(r, salt, s, cfgd), s, p[1], image_id(salt, str(r.image_path)), cache, cfgd))
    return tasks, rejected


def _call(fn, task: Task):
    """Run ``fn(task)`` in a worker, leaving a marker that says the task was in flight."""
    (task.cache / f"{task.key}.start").touch()
    return fn(task)


def _done(task: Task) -> bool:
    return (task.cache / f"{task.key}.json").is_file()


def _pool_pass(tasks: list[Task], workers: int, fn, bar) -> bool:
    """Run ``tasks`` in a fresh pool; returns False when a worker died (the pool broke)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mammodg.records.writer", "mammodg.io.dicom", "mammodg.preprocess.breast"])
    intact = True
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for fut in as_completed([pool.submit(_call, fn, t) for t in tasks]):
            try:
                fut.result()
                bar.update()
            except BrokenProcessPool:
                intact = False
    return intact


def _run(tasks: list[Task], workers: int, progress: bool, fn=process_row) -> None:
    """Process ``tasks`` with ``workers`` processes (in this process when 1).

    A worker killed by the OS (memory, a signal) breaks the pool: the rows that were in flight are then
    run again one at a time in a pool of their own, the one that kills its worker again is rejected
    (``worker_died``), and the others go on in a new pool. The build never waits on a dead worker.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="preprocess", unit="img", disable=not progress)
    if workers <= 1:
        for t in tasks:
            fn(t)
            bar.update()
        bar.close()
        return
    for t in tasks:
        (t.cache / f"{t.key}.start").unlink(missing_ok=True)
    pending = tasks
    while pending and not _pool_pass(pending, workers, fn, bar):
        left = [t for t in pending if not _done(t)]
        suspects = [t for t in left if (t.cache / f"{t.key}.start").exists()]
        if not suspects:
            raise BuildError("the worker pool broke before any row started (out of memory or processes?)")
        for t in suspects:
            if not _pool_pass([t], 1, fn, bar) and not _done(t):
                meta = {"key": t.key, "line": t.row.line, "status": "rejected", "reason": "worker_died",
                        "detail": "the worker processing this row was killed (out of memory or a signal), twice"}
                _atomic_write(t.cache / f"{t.key}.json", json.dumps(meta).encode())
                bar.update()
        pending = [t for t in left if not _done(t)]
    bar.close()


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


def write_shards(out: Path, metas: list[dict], read, shard_size: int) -> dict:
    """Group records by (split, segment, label), write shards atomically, return the ``splits`` index.

    ``metas`` need ``split``, ``segment``, ``label``, ``patient`` and ``line`` (the order inside a shard);
    ``read(meta)`` returns the serialized record. Each shard is listed with its record count, size and
    SHA-256, counted and hashed from disk: a build whose shards do not hold exactly the records it
    indexed raises BuildError. Shards an earlier ``dataset.json`` listed and this build did not rewrite
    are removed; no other file is.
    """
    import tensorflow as tf

    from mammodg.records.verify import shard_digest

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
            tmp = folder / f".{path.name}.tmp"
            with tf.io.TFRecordWriter(str(tmp)) as w:
                for m in part:
                    w.write(read(m))
            os.replace(tmp, path)
            written.add(path)
            shards.append({"path": str(path.relative_to(out)), "count": len(part)})
        entry = index.setdefault(split, {}).setdefault(segment, {})
        entry[str(label)] = {"count": len(ms), "patients": len({m["patient"] for m in ms}), "shards": shards}
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
    if on_disk != len(metas):
        raise BuildError(f"the shards hold {on_disk} records but {len(metas)} were indexed")
    for old in previous - written:  # shards of an earlier build that this one does not have
        old.unlink(missing_ok=True)
    return index


class _Lock:
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
                out[m["line"]] = _reject(m["line"], "duplicate_pixels_conflict", f"line {m['line']}: the same pixel data is on lines "
                                         f"{lines} under different patients or labels; all copies rejected")
        else:
            for m in ms[1:]:
                out[m["line"]] = _reject(m["line"], "duplicate_pixels", f"line {m['line']}: the same pixel data as line {ms[0]['line']} (same patient and label)")
    return out


def build(manifest: str | Path, out: str | Path, cfg: BuildConfig | None = None, *, progress: bool = True,
          root: str | Path | None = None, run_tasks=None) -> dict:
    """Build shards, ``dataset.json``, ``rejects.csv`` and ``provenance.csv``; returns the index.

    ``root``: when given, manifest image paths resolving outside it are rejected. ``run_tasks(tasks,
    workers, progress)`` runs :func:`process_row` on every task not yet cached: the local process pool
    (:func:`_run`) when None, or Apache Beam (:func:`mammodg.records.beam.beam_runner`); assembly stays here.
    """
    cfg = cfg or BuildConfig()
    check_config(cfg)
    out = Path(out)
    rows, bad, ignored = read_manifest(manifest, root=root)
    out.mkdir(parents=True, exist_ok=True)
    with _Lock(out):
        return _build(rows, bad, ignored, out, cfg, progress, run_tasks or _run)


def _build(rows, bad, ignored, out: Path, cfg: BuildConfig, progress: bool, run_tasks) -> dict:
    cache = out / CACHE_DIR
    cache.mkdir(exist_ok=True)
    salt = load_or_create_salt(out, cfg.pseudonym_salt)
    tasks, rejected = plan(rows, cfg, salt, cache)
    todo = [t for t in tasks if not _done(t)]
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    run_tasks(todo, min(workers, max(1, len(todo))), progress)
    t1 = time.perf_counter()

    metas = [json.loads((cache / f"{t.key}.json").read_text()) for t in tasks]
    ok = [m for m in metas if m["status"] == "ok"]
    dup = _duplicate_pixels(ok)
    ok = [m for m in ok if m["line"] not in dup]
    rejected += [dataclasses.asdict(b) for b in bad] + list(dup.values()) + [
        _reject(m["line"], m["reason"], m["detail"]) for m in metas if m["status"] != "ok"]
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
        "format": "mammodg-tfrecords/1",
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
    _atomic_write(out / INDEX_NAME, json.dumps(index, indent=1).encode())
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
