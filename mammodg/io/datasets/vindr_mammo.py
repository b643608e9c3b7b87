"""VinDr-Mammo (PhysioNet): breast-level and finding annotations + ``images/<study_id>/<image_id>.dicom``.

VinDr has no pathology: the image label and the lesion class of a box come from BI-RADS
(``DatasetConfig.malignant_birads``, default 4: BI-RADS 4 and 5 are malignant). Masses and suspicious
calcifications become boxes; the other finding categories go to ``other_findings`` in the same syntax
(``x_min y_min x_max y_max Category_Name [birads]``). A study is one patient's examination and VinDr
gives no patient id, so ``patient_id`` is the study id.
"""
from __future__ import annotations

import ast
import collections
from pathlib import Path

from mammodg.io.datasets.common import (DatasetConfig, Summary, at_least, birads_of, density_of, find_file,
                                        fmt_box, new_row, read_table, require, view_of, valid_box)

SOURCE = "VinDr-Mammo"
BREAST_FILE = "breast-level_annotations.csv"
FINDING_FILE = "finding_annotations.csv"
BREAST_COLUMNS = ("study_id", "image_id", "laterality", "view_position", "breast_birads", "breast_density", "split")
FINDING_COLUMNS = ("image_id", "finding_categories", "finding_birads", "xmin", "ymin", "xmax", "ymax")
BOX_KINDS = {"Mass": "mass", "Suspicious Calcification": "calc"}  # first match wins
EXTRA_COLUMNS = ("other_findings",)
SPLITS = {"training": "train", "train": "train", "test": "test"}


def _categories(text: str) -> list[str]:
    """"['Mass', 'Suspicious Calcification']" -> the list (as the CSV writes Python lists)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text.strip("[]").replace("'", "").split(",")
    return [str(c).strip() for c in (value if isinstance(value, (list, tuple)) else [value]) if str(c).strip()]


def read(root: Path, cfg: DatasetConfig, summary: Summary) -> list[dict]:
    breast_path = find_file(root, (BREAST_FILE,), "VinDr-Mammo breast-level annotations")
    finding_path = find_file(root, (FINDING_FILE,), "VinDr-Mammo finding annotations")
    header, breasts = read_table(breast_path)
    require(breast_path, header, BREAST_COLUMNS)
    fheader, findings = read_table(finding_path)
    require(finding_path, fheader, FINDING_COLUMNS)
    summary.files_read += [BREAST_FILE, FINDING_FILE]
    images_dir = breast_path.parent / "images"

    boxes, others = collections.defaultdict(list), collections.defaultdict(list)
    known = {rec["image_id"] for _, rec in breasts}
    for line, rec in findings:
        where = f"{FINDING_FILE} row {line}"
        cats = [c for c in _categories(rec["finding_categories"]) if c != "No Finding"]
        if not cats:
            continue
        if rec["image_id"] not in known:
            summary.note("finding_of_unlisted_image", f"{where}: image {rec['image_id']} not in {BREAST_FILE}")
            continue
        try:
            box = tuple(float(rec[k]) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            box = None
        try:  # coordinates are in the stored image; clip the few that run past its edge
            w, h = float(rec.get("width", "")), float(rec.get("height", ""))
        except ValueError:
            w = h = float("inf")
        if box is not None and (min(box[:2]) < 0 or box[2] > w or box[3] > h):
            summary.note("finding_box_clipped_to_image", f"{where}: {box} in a {w:g}x{h:g} image")
            box = (max(box[0], 0.0), max(box[1], 0.0), min(box[2], w), min(box[3], h))
        if box is None or not valid_box(box):
            summary.note("finding_without_valid_box", f"{where}: {cats} ({rec['xmin']}, {rec['ymin']}, {rec['xmax']}, {rec['ymax']})")
            continue
        birads = birads_of(rec["finding_birads"])
        kind = next((BOX_KINDS[c] for c in BOX_KINDS if c in cats), None)
        if kind:
            grade = "malignant" if at_least(birads, cfg.malignant_birads) else "benign"
            boxes[rec["image_id"]].append(fmt_box(box, f"{grade}_{kind}", birads))
        for c in cats:
            if c not in BOX_KINDS:
                others[rec["image_id"]].append(fmt_box(box, c.replace(" ", "_"), birads))

    rows = []
    for line, rec in breasts:
        where = f"{BREAST_FILE} row {line}"
        path = images_dir / rec["study_id"] / f"{rec['image_id']}.dicom"
        if not path.is_file():
            summary.skip("image_not_found", f"{where}: images/{rec['study_id']}/{rec['image_id']}.dicom")
            continue
        birads = birads_of(rec["breast_birads"])
        if not birads:
            summary.skip("no_breast_birads", f"{where}: breast_birads {rec['breast_birads']!r} (the label comes from it)")
            continue
        split = SPLITS.get(rec["split"].lower(), "")
        if not split:
            summary.note("unknown_split_left_empty", f"{where}: split {rec['split']!r}")
        rows.append(new_row(
            image_path=path, patient_id=rec["study_id"], source=SOURCE, view=view_of(rec["view_position"]),
            laterality=rec["laterality"].upper()[:1], label=int(at_least(birads, cfg.malignant_birads)),
            boxes=";".join(boxes[rec["image_id"]]), birads=birads, density=density_of(rec["breast_density"]),
            split=split, other_findings=";".join(others[rec["image_id"]])))
    return rows
