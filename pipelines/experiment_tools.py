"""Helpers of the pipelines' multi-seed experiments: the spread of a figure over training seeds, the count of
seeds whose paired difference is significant, and a single-segment view of a built dataset (for a baseline
trained on one data segment only, as the periodic-sampling paper's baseline (1))."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def spread(values) -> dict:
    """Mean, sample std (ddof=1; 0 for a single value), min and max of the finite values (None and NaN are
    skipped and not counted in ``n``)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def delta_spread(deltas, alpha: float = 0.05) -> dict:
    """:func:`spread` of the ``delta`` of paired comparisons (``bootstrap_delta_auc`` dicts, one per seed),
    plus ``n_sig_pos`` / ``n_sig_neg``: the seeds with ``p_value < alpha`` and a positive / negative delta."""
    ok = [d for d in deltas if d and d.get("delta") is not None and np.isfinite(d["delta"])]
    sig = [d for d in ok if d.get("p_value") is not None and d["p_value"] < alpha]
    return spread([d["delta"] for d in ok]) | {"n_sig_pos": sum(d["delta"] > 0 for d in sig),
                                                "n_sig_neg": sum(d["delta"] < 0 for d in sig)}


def over_seeds(per_seed: list[dict], leaf, depth: int) -> dict:
    """Combine ``depth``-level nested dicts, one per seed, key by key: each leaf becomes ``leaf(list of that
    leaf's values over the seeds that have it)``."""
    if depth == 0:
        return leaf(per_seed)
    keys = list(dict.fromkeys(k for tree in per_seed for k in tree))
    return {k: over_seeds([tree[k] for tree in per_seed if k in tree], leaf, depth - 1) for k in keys}


def segment_view(data_dir: str | Path, out_dir: str | Path, segments, splits=("train", "val")) -> dict:
    """Write ``out_dir/dataset.json``: the index of ``data_dir`` restricted to the data segments ``segments``
    (names as in the index, e.g. ``"S1|VendorA"``) and to ``splits``; its shard paths point into ``data_dir``
    (relative), so nothing is copied; ``records`` and ``segments`` are recounted. A trainer given ``out_dir`` samples, validates and counts only those
    segments. Returns the written index."""
    from mammodg.records.reader import INDEX_NAME, DatasetError, load_index

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    index = load_index(data_dir)
    rel = Path(os.path.relpath(data_dir, out_dir))
    view = {k: v for k, v in index.items() if k != "splits"}
    view["splits"] = {}
    for split in splits:
        have = index["splits"].get(split, {})
        missing = [s for s in segments if s not in have]
        if missing:
            raise DatasetError(f"{data_dir / INDEX_NAME}: split {split!r} has no segment {missing}; it has {sorted(have)}")
        view["splits"][split] = {s: {lab: e | {"shards": [sh | {"path": str(rel / sh["path"])} for sh in e["shards"]]}
                                     for lab, e in have[s].items()} for s in segments}
    view["records"] = sum(e["count"] for segs in view["splits"].values() for labs in segs.values() for e in labs.values())
    view["segments"] = sorted(segments)
    view["view_of"] = str(rel)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).write_text(json.dumps(view, indent=1))
    return view
