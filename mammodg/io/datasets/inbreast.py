"""INbreast: the metadata sheet (INbreast.csv, or .xlsx) + AllDICOMs + the per-image XML ROI files (AllXML).

Files are matched by the numeric prefix of their names: sheet ``File Name`` 22678622 ->
``AllDICOMs/22678622_<patient>_MG_<L|R>_<view>_ANON.dcm`` and ``AllXML/22678622.xml``; the patient id is
the second part of the DICOM file name (the sheet's ``Patient ID`` column reads "removed"). The XML
files are Apple property lists (``plistlib``). Masses and calcification clusters become boxes (bounding
box of the ROI's ``Point_px`` outline); single calcifications (``Calcification`` ROIs) are dropped and
counted; other ROIs (distortion, asymmetry, spiculated region) go to ``other_findings``. INbreast has
no per-lesion pathology: label and lesion class come from the image's BI-RADS
(``DatasetConfig.malignant_birads``).
"""
from __future__ import annotations

import plistlib
import re
from pathlib import Path

from mammodg.io.datasets.common import (DatasetConfig, Summary, at_least, birads_of, density_of, find_file,
                                        fmt_box, new_row, read_table, require, valid_box, view_of)

SOURCE = "INbreast"
SHEETS = ("INbreast.csv", "INbreast.xlsx", "INbreast.xls")
COLUMNS = ("Laterality", "View", "File Name", "ACR", "Bi-Rads")
EXTRA_COLUMNS = ("other_findings",)
_PREFIX = re.compile(r"^(\d+)(?=[_.]|$)")
_POINT = re.compile(r"\(\s*([-\d.eE+]+)\s*,\s*([-\d.eE+]+)")


def _by_prefix(root: Path, pattern: str) -> dict[str, Path]:
    out = {}
    for p in sorted(root.rglob(pattern)):
        m = _PREFIX.match(p.name)
        if m:
            out.setdefault(m.group(1), p)
    return out


def rois(xml: Path) -> list[tuple[str, list[tuple[float, float]]]]:
    """[(ROI name, [(x, y) pixel points])] of one INbreast XML file."""
    with open(xml, "rb") as f:
        doc = plistlib.load(f)
    out = []
    for image in doc.get("Images", []):
        for roi in image.get("ROIs", []):
            pts = [(float(m.group(1)), float(m.group(2))) for s in roi.get("Point_px", []) for m in [_POINT.match(str(s))] if m]
            out.append((str(roi.get("Name", "")).strip(), pts))
    return out


def read(root: Path, cfg: DatasetConfig, summary: Summary) -> list[dict]:
    sheet = find_file(root, SHEETS, "INbreast metadata sheet")
    header, recs = read_table(sheet)
    require(sheet, header, COLUMNS)
    summary.files_read.append(sheet.name)
    dicoms = _by_prefix(root, "*.dcm")
    xmls = _by_prefix(root, "*.xml")
    if xmls:
        summary.files_read.append(f"{len(xmls)} XML ROI files")
    rows = []
    for line, rec in recs:
        where = f"{sheet.name} row {line}"
        m = re.match(r"\d+", rec["file name"])
        if not m:
            summary.skip("no_file_name", f"{where}: File Name {rec['file name']!r}")
            continue
        number = m.group()
        path = dicoms.get(number)
        if path is None:
            summary.skip("image_not_found", f"{where}: no {number}_*.dcm")
            continue
        birads = birads_of(rec["bi-rads"])
        if not birads:
            summary.skip("no_birads", f"{where}: Bi-Rads {rec['bi-rads']!r} (the label comes from it)")
            continue
        malignant = at_least(birads, cfg.malignant_birads)
        parts = path.stem.split("_")
        boxes, others = [], []
        xml = xmls.get(number)
        try:
            found = rois(xml) if xml else []
        except Exception as e:  # plistlib raises several types for a broken file
            summary.note("unreadable_xml", f"{xml.name}: {type(e).__name__}: {e}; image kept without boxes")
            found = []
        for name, pts in found:
            key = name.lower()
            if key.startswith("calcification"):
                summary.note("single_calcification_dropped", f"{xml.name}: {name} ({len(pts)} point(s))")
                continue
            box = (min(x for x, _ in pts), min(y for _, y in pts), max(x for x, _ in pts), max(y for _, y in pts)) if pts else None
            if box is None or not valid_box(box):
                summary.note("roi_without_area", f"{xml.name}: {name} ({len(pts)} point(s))")
                continue
            kind = {"mass": "mass", "cluster": "calc"}.get(key)
            if kind:
                boxes.append(fmt_box(box, f"{'malignant' if malignant else 'benign'}_{kind}", birads))
            else:
                others.append(fmt_box(box, re.sub(r"\s+", "_", name) or "unnamed", birads))
        rows.append(new_row(
            image_path=path, patient_id=parts[1] if len(parts) > 2 else number, source=SOURCE,
            view=view_of(rec["view"]), laterality=rec["laterality"].upper()[:1], label=int(malignant),
            boxes=";".join(boxes), birads=birads, density=density_of(rec["acr"]), other_findings=";".join(others)))
    return rows
