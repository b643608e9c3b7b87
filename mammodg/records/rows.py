"""Phase 1 of the build: every manifest row read, preprocessed and encoded into its cache entry.

:func:`plan_rows` gives each row its pseudonym, split and cache key (a hash of everything its output
depends on); :func:`process_row` writes ``<cache>/<key>.rec`` (the serialized record) and then
``<key>.json`` (its metadata or its rejection), which marks the row done; :func:`run_local` runs rows
in a process pool that survives a worker killed by the OS.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import traceback
from pathlib import Path

import numpy as np

from mammodg.config import BuildConfig, to_dict
from mammodg.io.atomic import atomic_write_bytes, atomic_write_json
from mammodg.io.manifest import Row
from mammodg.records.schema import encode_example, encode_png16
from mammodg.records.shards import BuildError
from mammodg.records.split import image_id, pseudonym, split_patients


@dataclasses.dataclass
class RowTask:
    """One manifest row to process, with what :func:`plan_rows` decided for it (picklable)."""
    row: Row
    key: str
    split: str
    patient: str
    image_id: str
    cache: Path
    cfg: dict  # BuildConfig as a dict (picklable, cheap)


def rejection(line: int, reason: str, detail: str) -> dict:
    """A row of ``rejects.csv``: manifest line, reason code and a one-line detail (never a path)."""
    return {"line": line, "reason": reason, "detail": detail}


def _segment_of(values: dict, keys: list[str]) -> str:
    return "|".join(str(values.get(k) or "UNKNOWN") for k in keys)


def _without_path(text: str, path: Path) -> str:
    """A rejection detail with the image's path removed (it goes to provenance.csv only)."""
    for p in sorted({str(path), os.path.realpath(path), path.name}, key=len, reverse=True):
        if len(p) > 3:
            text = text.replace(p, "<image_path>")
    return text


def process_row(task: RowTask) -> dict:
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
        atomic_write_bytes(task.cache / f"{task.key}.rec", encode_example(feats))
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
    atomic_write_json(task.cache / f"{task.key}.json", meta, indent=None)
    return meta


def _row_key(row: Row, salt: str, split: str, cfg: dict) -> str:
    try:
        st = os.stat(row.image_path)
        st = (st.st_size, st.st_mtime_ns)
    except OSError:
        st = None
    ident = json.dumps([dataclasses.asdict(row), str(row.image_path), st, salt, split, cfg["preprocess"],
                        cfg["segment_keys"], cfg["patient_key"], cfg["allow_non_mg"], cfg["reject_burned_in"], cfg["png_compress_level"]],
                       default=str, sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def patient_of_row(row: Row, salt: str, patient_key: str) -> tuple[str, str]:
    """The (source, pseudonym) a row's patient is keyed by: per source by default; with ``patient_key:
    patient_id`` one patient across sources (source ``*``, the pseudonym of the id alone)."""
    source = "*" if patient_key == "patient_id" else row.source
    return source, pseudonym(salt, source, row.patient_id)


def plan_rows(rows: list[Row], cfg: BuildConfig, salt: str, cache: Path) -> tuple[list[RowTask], list[dict]]:
    """Pseudonyms, the split and the cache key of every row; returns (tasks, rejected rows).

    A patient's split is the manifest's ``split`` when any of its rows gives one (all its rows follow),
    else :func:`split_patients`. Rows of a patient the manifest puts in two splits are all rejected.
    """
    patient_of = {r.line: patient_of_row(r, salt, cfg.patient_key) for r in rows}
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
            rejected.append(rejection(r.line, "split_conflict", f"line {r.line}: the manifest's split column puts this patient in "
                                      f"{' and '.join(sorted(given[p]))} (its lines: {', '.join(map(str, lines[p]))})"))
            continue
        s = next(iter(given[p])) if p in given else auto[p]
        tasks.append(RowTask(r, _row_key(r, salt, s, cfgd), s, p[1], image_id(salt, str(r.image_path)), cache, cfgd))
    return tasks, rejected


# ------------------------------------------------------------------------------ the local process pool
def _call(fn, task: RowTask):
    """Run ``fn(task)`` in a worker, leaving a marker that says the task was in flight."""
    (task.cache / f"{task.key}.start").touch()
    return fn(task)


def is_done(task: RowTask) -> bool:
    """Whether the row's cache entry is complete (its ``.json`` is written last)."""
    return (task.cache / f"{task.key}.json").is_file()


def _pool_pass(tasks: list[RowTask], workers: int, fn, bar) -> bool:
    """Run ``tasks`` in a fresh pool; returns False when a worker died (the pool broke)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mammodg.records.rows", "mammodg.io.dicom", "mammodg.preprocess.breast"])
    intact = True
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        for fut in as_completed([pool.submit(_call, fn, t) for t in tasks]):
            try:
                fut.result()
                bar.update()
            except BrokenProcessPool:
                intact = False
    return intact


def run_local(tasks: list[RowTask], workers: int, progress: bool, fn=process_row) -> None:
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
        left = [t for t in pending if not is_done(t)]
        suspects = [t for t in left if (t.cache / f"{t.key}.start").exists()]
        if not suspects:
            raise BuildError("the worker pool broke before any row started (out of memory or processes?)")
        for t in suspects:
            if not _pool_pass([t], 1, fn, bar) and not is_done(t):
                meta = {"key": t.key, "line": t.row.line, "status": "rejected", "reason": "worker_died",
                        "detail": "the worker processing this row was killed (out of memory or a signal), twice"}
                atomic_write_json(t.cache / f"{t.key}.json", meta, indent=None)
                bar.update()
        pending = [t for t in left if not is_done(t)]
    bar.close()
