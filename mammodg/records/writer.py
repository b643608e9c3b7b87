"""``mammodg build-tfrecords``: manifest -> per-split, per-segment, per-label TFRecord shards + index.

Two phases, both restartable:

1. *process* (all cores): each manifest row is read, preprocessed and encoded into a serialized
   ``tf.train.Example``, written to ``<out>/_cache/<key>.rec``; then ``<key>.json`` (its metadata or its
   rejection reason) is written, atomically, and marks the row done. A re-run skips done rows; the key
   hashes everything the output depends on, so a changed config or file is processed again.
2. *assemble*: records are grouped by (split, data segment, label), ordered by manifest line, and
   written into shards through temporary names renamed into place; ``dataset.json`` is written last.

A killed build re-run therefore ends with exactly the shards of an uninterrupted one, and a shard
never exists under its final name unless complete.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import time
import traceback
from pathlib import Path

import numpy as np

from mammodg.config import BuildConfig, to_dict
from mammodg.io.manifest import BadRow, Row, read_manifest
from mammodg.records.schema import encode_example
from mammodg.records.split import load_or_create_salt, pseudonym, split_patients

INDEX_NAME = "dataset.json"
REJECTS_NAME = "rejects.csv"
CACHE_DIR = "_cache"
EXIT_OK, EXIT_REJECTED, EXIT_ERROR = 0, 1, 2


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def encode_png16(image: np.ndarray, compress_level: int = 1) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint16)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def segment_slug(segment: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", segment).strip("_") or "segment"


@dataclasses.dataclass
class Task:
    row: Row
    key: str
    split: str
    patient: str
    cache: Path
    cfg: dict  # BuildConfig as a dict (picklable, cheap)


def _segment_of(values: dict, keys: list[str]) -> str:
    return "|".join(str(values.get(k) or "UNKNOWN") for k in keys)


def process_row(task: Task) -> dict:
    """Read, preprocess and encode one row; writes its cache entry and returns its metadata.

    Never raises: every failure becomes a rejection with a reason, so one bad file cannot stop a build.
    """
    from mammodg.io.dicom import DicomRejected, read_dicom
    from mammodg.preprocess.breast import preprocess

    row, cfg = task.row, task.cfg
    pp = cfg["preprocess"]
    meta = {"key": task.key, "line": row.line, "image_path": str(row.image_path)}
    try:
        img = read_dicom(row.image_path, voi=pp["voi"], allow_non_mg=cfg["allow_non_mg"])
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
            "patient": task.patient, "image_id": task.key, "birads": row.birads, "density": row.density,
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
        meta.update(status="ok", split=task.split, segment=segment, label=row.label, patient=task.patient,
                    manufacturer=values["manufacturer"], view=values["view"], warnings=warnings)
    except DicomRejected as e:
        meta.update(status="rejected", reason=e.reason, detail=str(e))
    except Exception as e:  # an unexpected failure on one file must not stop the build
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        meta.update(status="rejected", reason="processing_error", detail=tb)
    _atomic_write(task.cache / f"{task.key}.json", json.dumps(meta).encode())
    return meta


def _row_key(row: Row, salt: str, split: str, cfg: dict) -> str:
    st = row.image_path.stat() if row.image_path.is_file() else None
    ident = json.dumps([dataclasses.asdict(row), str(row.image_path), st and (st.st_size, st.st_mtime_ns),
                        salt, split, cfg["preprocess"], cfg["segment_keys"], cfg["allow_non_mg"],
                        cfg["png_compress_level"]], default=str, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def plan(rows: list[Row], cfg: BuildConfig, salt: str, cache: Path) -> list[Task]:
    """Pseudonyms, the split and the cache key of every row."""
    malignant: dict[tuple[str, str], int] = collections.defaultdict(int)
    pseudo = {}
    for r in rows:
        pseudo[r.line] = pseudonym(salt, r.source, r.patient_id)
        malignant[(r.source, pseudo[r.line])] |= r.label
    split = split_patients(dict(malignant), cfg.val_fraction, cfg.seed)
    cfgd = to_dict(cfg)
    tasks = []
    for r in rows:
        s = r.split or split[(r.source, pseudo[r.line])]
        tasks.append(Task(r, _row_key(r, salt, s, cfgd), s, pseudo[r.line], cache, cfgd))
    return tasks


def _run(tasks: list[Task], workers: int, progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc="preprocess", unit="img", disable=not progress)
    if workers <= 1:
        for t in tasks:
            process_row(t)
            bar.update()
    else:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["mammodg.records.writer", "mammodg.io.dicom", "mammodg.preprocess.breast"])
        with ctx.Pool(workers) as pool:
            for _ in pool.imap_unordered(process_row, tasks, chunksize=1):
                bar.update()
    bar.close()


def write_shards(out: Path, metas: list[dict], read, shard_size: int) -> dict:
    """Group records by (split, segment, label), write shards atomically, return the ``splits`` index.

    ``metas`` need ``split``, ``segment``, ``label``, ``patient`` and ``line`` (the order inside a shard);
    ``read(meta)`` returns the serialized record. Shards of an earlier build not rewritten are removed.
    """
    import tensorflow as tf

    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for m in metas:
        groups[(m["split"], m["segment"], m["label"])].append(m)
    index: dict = {}
    written = set()
    for (split, segment, label), ms in sorted(groups.items()):
        ms.sort(key=lambda m: m["line"])
        n_shards = -(-len(ms) // shard_size)
        folder = out / split / segment_slug(segment)
        folder.mkdir(parents=True, exist_ok=True)
        shards = []
        for i in range(n_shards):
            part = ms[i * shard_size:(i + 1) * shard_size]
            path = folder / f"label{label}-{i:05d}-of-{n_shards:05d}.tfrecord"
            tmp = folder / f".{path.name}.tmp"
            with tf.io.TFRecordWriter(str(tmp)) as w:
                for m in part:
                    w.write(read(m))
            os.replace(tmp, path)
            written.add(path)
            shards.append({"path": str(path.relative_to(out)), "count": len(part)})
        entry = index.setdefault(split, {}).setdefault(segment, {})
        entry[str(label)] = {"count": len(ms), "patients": len({m["patient"] for m in ms}), "shards": shards}
    for old in out.glob("*/*/*.tfrecord"):  # shards of an earlier build that this one does not have
        if old not in written:
            old.unlink()
    return index


def build(manifest: str | Path, out: str | Path, cfg: BuildConfig | None = None, *, progress: bool = True) -> dict:
    """Build shards and ``dataset.json``; returns the index (with ``rejected`` rows listed)."""
    cfg = cfg or BuildConfig()
    out = Path(out)
    rows, bad, ignored = read_manifest(manifest)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / CACHE_DIR
    cache.mkdir(exist_ok=True)
    salt = load_or_create_salt(out, cfg.pseudonym_salt)
    tasks = plan(rows, cfg, salt, cache)
    todo = [t for t in tasks if not (cache / f"{t.key}.json").is_file()]
    workers = cfg.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    _run(todo, min(workers, max(1, len(todo))), progress)
    t1 = time.perf_counter()

    metas = [json.loads((cache / f"{t.key}.json").read_text()) for t in tasks]
    ok = [m for m in metas if m["status"] == "ok"]
    rejected = [dataclasses.asdict(b) for b in bad] + [
        {"line": m["line"], "image_path": m["image_path"], "reason": m["reason"], "detail": m["detail"]}
        for m in metas if m["status"] != "ok"]
    rejected.sort(key=lambda r: r["line"])
    splits = write_shards(out, ok, lambda m: (cache / f"{m['key']}.rec").read_bytes(), cfg.shard_size)
    t2 = time.perf_counter()

    with open(out / f".{REJECTS_NAME}.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["line", "image_path", "reason", "detail"])
        w.writeheader()
        w.writerows(rejected)
    os.replace(out / f".{REJECTS_NAME}.tmp", out / REJECTS_NAME)
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
