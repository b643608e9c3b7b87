"""The phantom data set: every image of every patient, its ``manifest.csv`` and ``landmarks.json``.

The manifest follows the schema of :mod:`mammodg.io.manifest` (README, "Manifest"), whose column
names it imports. ``landmarks.json`` maps each manifest ``image_path`` to the image's true
landmarks (:func:`~mammodg.phantom.anatomy.landmarks`), to check a landmark estimator against.
"""
from __future__ import annotations

import csv
import json
import pathlib
from typing import Sequence

import numpy as np

from mammodg.io.manifest import BIRADS, OPTIONAL, REQUIRED
from mammodg.phantom.anatomy import landmarks, sample_patient
from mammodg.phantom.dicom_writer import write_dicom
from mammodg.phantom.render import render
from mammodg.phantom.styles import Style, default_styles

# README's column order: ids and source, the fields read from DICOM when empty, label, findings
MANIFEST_COLUMNS = REQUIRED[:3] + OPTIONAL[:3] + REQUIRED[3:] + OPTIONAL[3:]
BIRADS_ORDER = BIRADS  # mammodg.io.manifest lists the categories in rising order


def _fmt_box(b: dict) -> str:
    """One lesion in the manifest's ``boxes`` syntax."""
    x0, y0, x1, y1 = b["box"]
    return f"{x0:.1f} {y0:.1f} {x1:.1f} {y1:.1f} {b['lesion_class']} {b['birads']}"


def _max_birads(boxes: list[dict]) -> str:
    """The image's BI-RADS: its most suspicious lesion's, "1" (negative) without lesions."""
    if not boxes:
        return "1"
    return max((b["birads"] for b in boxes), key=BIRADS_ORDER.index)


def make_phantoms(
    out_dir,
    *,
    patients: int,
    styles: "int | Sequence[Style]",
    seed: int,
    scale: float = 1.0,
    source: str = "PHANTOM",
    all_styles: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Write a phantom data set and return the path of ``out_dir/manifest.csv``.

    ``styles`` is a number of :func:`~mammodg.phantom.styles.default_styles` or a list of styles.
    Patient i (id ``PH%05d``, drawn from ``default_rng([seed, i])``, so independent of the other
    patients) is rendered in style ``i % K`` (or in every style when ``all_styles``); 4 images per
    rendering (L/R x CC/MLO) at ``out_dir/<style.name>/<patient_id>_<L|R>_<CC|MLO>.dcm``. Rows are
    sorted by style, patient, laterality, view. ``out_dir/landmarks.json`` holds the true landmarks.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    style_list = default_styles(int(styles)) if isinstance(styles, (int, np.integer)) else list(styles)
    K = len(style_list)
    if K < 1:
        raise ValueError("need at least one style")
    jobs = []  # (patient_index, [style indices])
    for i in range(int(patients)):
        jobs.append((i, list(range(K)) if all_styles else [i % K]))
    total = sum(len(s) for _, s in jobs) * 4
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="phantoms", unit="img")
        except ImportError:  # pragma: no cover
            bar = None
    rows = []
    marks = {}  # image_path -> true landmarks
    try:
        for i, style_idx in jobs:
            pid = f"PH{i:05d}"
            breasts = sample_patient(np.random.default_rng([int(seed), i]), i)
            for br in breasts:
                for view in ("CC", "MLO"):
                    for si in style_idx:  # styles innermost: the canonical anatomy is reused
                        st = style_list[si]
                        px, boxes = render(br, view, st, scale=scale)
                        rel = f"{st.name}/{pid}_{br.laterality}_{view}.dcm"
                        write_dicom(out / rel, px, style=st, breast=br, view=view, patient_id=pid,
                                    scale=scale, seed=seed, source=source)
                        marks[rel] = landmarks(br, view, st, scale=scale)
                        label = int(any(b["lesion_class"].startswith("malignant") for b in boxes))
                        rows.append(((si, i, br.laterality, view), {
                            "image_path": rel,
                            "patient_id": pid,
                            "source": source,
                            "manufacturer": "",
                            "view": view,
                            "laterality": br.laterality,
                            "label": str(label),
                            "boxes": ";".join(_fmt_box(b) for b in boxes),
                            "birads": _max_birads(boxes),
                            "density": br.density_letter,
                            "split": "",
                        }))
                        if bar is not None:
                            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    rows.sort(key=lambda r: (r[0][0], r[0][1], r[0][2], 0 if r[0][3] == "CC" else 1))
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        for _, r in rows:
            w.writerow(r)
    lines = [f'{json.dumps(r["image_path"])}: {json.dumps(marks[r["image_path"]])}' for _, r in rows]
    (out / "landmarks.json").write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")  # an image a line
    return manifest
