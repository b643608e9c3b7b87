"""Breast-level records for contrastive pre-training: ``mammodg build-pairs``.

One record per breast (patient pseudonym + laterality, within one split and data segment) holding its
views (CC and MLO when present) and, for each view, the image in every *seen* vendor style: its own
style first, then the CycleGAN transfers to the other seen styles (MSVCL v2 section III-B1).

Style diversification is **materialised offline** here, not computed online: a ResNet generator costs
far more per image than the rest of the input pipeline (measured: ``transfer_s_per_image`` in the index,
against a few ms to decode a PNG), and one build serves every contrastive run and method. Blending
(eq. 2) is cheap and random, so it happens online in the pipeline (:mod:`mammodg.stages.contrastive`).

Images of a breast whose segment is not a seen style keep only their own style (they still give
SimCLR / multi-view positives). Records are sharded per split, segment and label like the image
records, with a ``dataset.json`` of the same format (``kind: pairs``), so the segment-aware samplers
of :mod:`mammodg.sampling.streams` read them unchanged. Breasts are grouped while streaming the image
records (shards keep manifest order), so memory holds only breasts still waiting for a view.
"""
from __future__ import annotations

import collections
import io
import time
from pathlib import Path

import numpy as np

PAIR_FIELDS: dict[str, tuple[str, bool]] = {
    "images": ("bytes", True),  # 16-bit PNGs (stored encoding), view-major: views[0] in every style, then views[1]...
    "views": ("bytes", True),  # CC, MLO (or the one view present)
    "styles": ("bytes", True),  # style of each column; styles[0] = the breast's own data segment
    "image_ids": ("bytes", True),  # source image of each view
    "height": ("int", False),
    "width": ("int", False),
    "label": ("int", False),  # 1 if any image of the breast is malignant
    "data_segment": ("bytes", False),
    "split": ("bytes", False),
    "patient": ("bytes", False),  # pseudonym, as in the image records
    "laterality": ("bytes", False),
    "source": ("bytes", False),
    "manufacturer": ("bytes", False),
    "density": ("bytes", False),
}
VIEW_ORDER = ("CC", "MLO")
GROUP_ID_BUCKETS = 2**24  # the largest range float32 holds exactly: Keras casts y_true to float32


def patient_group_id(patient):
    """int64 group id of a ``patient`` pseudonym (string tensor, any shape) for NT-Xent's ``groups``:
    a stable hash (FarmHash) into ``GROUP_ID_BUCKETS``, exact as a float32 ``y_true``. Two patients share
    an id with probability 2**-24; they then only stop being each other's negatives."""
    import tensorflow as tf

    return tf.strings.to_hash_bucket_fast(patient, GROUP_ID_BUCKETS)


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)), dtype=np.uint16)


def _records(files: list[str]):
    """Image records of shards, in order, as numpy-friendly dicts (image left as PNG bytes)."""
    import tensorflow as tf

    from mammodg.records.schema import parse

    for raw in tf.data.TFRecordDataset(files):
        r = parse(raw, decode_image=False)
        out = {k: (v.numpy().decode() if v.dtype == tf.string and v.shape.rank == 0 else v.numpy())
               for k, v in r.items() if k not in ("image", "boxes", "lesion_class", "lesion_birads")}
        out["image"] = r["image"].numpy()
        yield out


class _Breast:
    def __init__(self, first: dict):
        self.meta = first
        self.views: dict[str, dict] = {}
        self.label = 0
        self.extra = 0

    def add(self, r: dict) -> None:
        view = r["view"] or "OTHER"
        self.label = max(self.label, int(r["label"]))
        if view in self.views:
            self.extra += 1
        else:
            self.views[view] = r

    def complete(self) -> bool:
        return all(v in self.views for v in VIEW_ORDER)


def _encode_breast(b: _Breast, transfer, seen: list[str], size) -> tuple[bytes, dict]:
    from mammodg.preprocess.breast import from_stored, resize_stored, to_stored
    from mammodg.records.schema import encode_example, encode_png16

    segment = b.meta["data_segment"]
    styles = [segment] + ([s for s in seen if s != segment] if transfer is not None and segment in seen else [])
    views = [v for v in VIEW_ORDER if v in b.views] or sorted(b.views)[:1]
    images, t_transfer, n_transfer = [], 0.0, 0
    for view in views:
        rendered = [_unpng(b.views[view]["image"])]
        if len(styles) > 1:  # at the stored scale the generators were trained on, then resized with the rest
            v, mask = from_stored(rendered[0])
            t = time.perf_counter()
            rendered += [to_stored(transfer.transfer(v[None, ..., None], mask[None, ..., None], segment, dst)[0, ..., 0],
                                   mask) for dst in styles[1:]]
            t_transfer += time.perf_counter() - t
            n_transfer += len(styles) - 1
        rendered = [resize_stored(r, *size) for r in rendered] if size else rendered
        images += [encode_png16(r) for r in rendered]
    h, w = rendered[0].shape
    m = b.meta
    rec = encode_example({
        "images": images, "views": views, "styles": styles,
        "image_ids": [b.views[v]["image_id"] for v in views], "height": h, "width": w, "label": b.label,
        "data_segment": segment, "split": m["split"], "patient": m["patient"], "laterality": m["laterality"],
        "source": m["source"], "manufacturer": m["manufacturer"], "density": m["density"],
    }, PAIR_FIELDS)
    return rec, {"transfer_s": t_transfer, "transfers": n_transfer, "views": len(views)}


def build_pairs(data_dir, out, *, transfer=None, size: tuple[int, int] | None = None,
                shard_size: int = 256, progress: bool = True) -> dict:
    """Image records of ``data_dir`` -> breast-level pair records in ``out`` (see the module docstring).

    ``transfer``: a :class:`mammodg.records.styles.StyleTransfer` (``styles`` and ``transfer(images01,
    masks, src, dst)``) or None (own style only). ``size`` (rows, cols) resizes every rendering (contrastive
    inputs are usually smaller than the 1152x832 records); transfers run before, at the stored scale the
    CycleGAN was trained on (a generator applied to a downsized image sees noise and edges it never saw). Returns the ``dataset.json``
    index written to ``out``.
    """
    from tqdm import tqdm

    from mammodg.io.atomic import atomic_write_json
    from mammodg.records.reader import INDEX_FORMAT, INDEX_NAME, load_index, streams
    from mammodg.records.shards import write_shards

    index = load_index(data_dir)
    if index.get("kind") == "pairs":
        raise ValueError(f"{data_dir} already holds pair records; give the image records (mammodg build-tfrecords)")
    seen = list(transfer.styles) if transfer is not None else []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "_cache"  # encoded records wait here (not in memory) until the shards are assembled
    cache.mkdir(exist_ok=True)
    metas, stats = [], collections.Counter()
    total = index["records"]
    bar = tqdm(total=total, desc="pairs", unit="img", disable=not progress)
    for split in sorted(index["splits"]):
        by_segment = collections.defaultdict(list)
        for (segment, _), (files, _) in sorted(streams(index, data_dir, split).items()):
            by_segment[segment] += files
        for segment, files in sorted(by_segment.items()):
            pending: dict[tuple, _Breast] = {}

            def emit(key):
                b = pending.pop(key)
                rec, st = _encode_breast(b, transfer, seen, size)
                i = len(metas)
                (cache / f"{i}.rec").write_bytes(rec)
                metas.append({"split": split, "segment": segment, "label": b.label, "patient": b.meta["patient"], "line": i})
                stats.update(breasts=1, images=len(b.views), extra_images_skipped=b.extra,
                             both_views=int(b.complete()), transfers=st["transfers"])
                stats["transfer_s"] += st["transfer_s"]

            for r in _records(files):
                key = (r["patient"], r["laterality"] or r["image_id"])
                pending.setdefault(key, _Breast(r)).add(r)
                if pending[key].complete():
                    emit(key)
                bar.update()
            for key in sorted(pending):
                emit(key)
    bar.close()
    splits = write_shards(out, metas, lambda m: (cache / f"{m['line']}.rec").read_bytes(), shard_size)
    for p in cache.iterdir():
        p.unlink()
    cache.rmdir()
    h, w = size or index["image_shape"]
    pair_index = {
        "format": INDEX_FORMAT,
        "kind": "pairs",
        "source_data": str(Path(data_dir).resolve()),
        "cyclegan_run": str(getattr(transfer, "run_dir", "")),
        "seen_styles": seen,
        "records": len(metas),
        "image_shape": [h, w],
        "stats": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()},
        "transfer_s_per_image": round(stats["transfer_s"] / stats["transfers"], 4) if stats["transfers"] else None,
        "bytes": sum((out / s["path"]).stat().st_size for sp in splits.values() for seg in sp.values()
                     for lab in seg.values() for s in lab["shards"]),
        "segments": sorted({m["segment"] for m in metas}),
        "splits": splits,
    }
    atomic_write_json(out / INDEX_NAME, pair_index)
    return pair_index


def format_pairs_summary(index: dict) -> str:
    s = index["stats"]
    lines = [f"breast records: {index['records']}  (both CC and MLO: {s.get('both_views', 0)}, "
             f"extra images of an already present view skipped: {s.get('extra_images_skipped', 0)})",
             f"seen styles: {', '.join(index['seen_styles']) or '(none: no CycleGAN run given)'}"]
    if index["transfer_s_per_image"] is not None:
        lines.append(f"style transfers: {s['transfers']} at {index['transfer_s_per_image'] * 1000:.1f} ms each")
    lines.append(f"size on disk: {index['bytes'] / 1e6:.1f} MB")
    return "\n".join(lines)


def parse_pair(serialized):
    """Parse one pair record (lists dense; images still PNG bytes)."""
    from mammodg.records.schema import parse_fields

    return parse_fields(serialized, PAIR_FIELDS)
