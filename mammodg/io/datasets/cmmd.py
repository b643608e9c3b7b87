"""CMMD (TCIA): ``CMMD_clinicaldata_revision`` (.xlsx as distributed, or .csv) + the DICOMs below ``<ID1>/``.

The clinical sheet has one row per patient (``ID1``) and breast (``LeftRight``) with the biopsy result
(``classification``: Benign / Malignant) and, for malignant ones, the molecular ``subtype``. The
DICOMs carry no such link but their laterality: each image under a patient's folder is matched to the
row of its breast by the DICOM laterality. Image-level labels only, no boxes.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

from mammodg.io.datasets.common import DatasetConfig, Summary, find_file, new_row, read_table, require

SOURCE = "CMMD"
SHEETS = ("CMMD_clinicaldata_revision.xlsx", "CMMD_clinicaldata_revision.csv")
COLUMNS = ("ID1", "LeftRight", "classification")
EXTRA_COLUMNS = ("abnormality", "subtype")
LABELS = {"benign": 0, "malignant": 1}
_PATIENT = re.compile(r"^D\d-\d{4}$")


def read(root: Path, cfg: DatasetConfig, summary: Summary) -> list[dict]:
    import pydicom

    from mammodg.io.dicom import laterality_of, view_of

    sheet = find_file(root, SHEETS, "CMMD clinical data")
    header, recs = read_table(sheet)
    require(sheet, header, COLUMNS)
    summary.files_read.append(sheet.name)
    clinical = {}
    for line, rec in recs:
        where = f"{sheet.name} row {line}"
        label = LABELS.get(rec["classification"].lower())
        side = rec["leftright"].upper()[:1]
        if label is None or side not in ("L", "R") or not rec["id1"]:
            summary.skip("bad_clinical_row", f"{where}: ID1 {rec['id1']!r}, LeftRight {rec['leftright']!r}, classification {rec['classification']!r}")
            continue
        clinical[(rec["id1"], side)] = (line, label, rec)

    images = collections.defaultdict(list)
    for p in sorted(root.rglob("*.dcm")):
        patient = next((part for part in reversed(p.relative_to(root).parts[:-1]) if _PATIENT.match(part)), None)
        if patient is None:
            summary.skip("dicom_outside_patient_folder", str(p.relative_to(root)))
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:
            summary.skip("unreadable_dicom", f"{p.relative_to(root)}: {type(e).__name__}")
            continue
        side = laterality_of(ds)
        if not side:
            summary.skip("no_laterality_in_dicom", f"{p.relative_to(root)}: the breast cannot be matched to its clinical row")
            continue
        if (patient, side) not in clinical:
            summary.skip("no_clinical_row_for_breast", f"{p.relative_to(root)}: {patient} {side}")
            continue
        images[(patient, side)].append((p, view_of(ds)))

    rows = []
    for (patient, side), (line, label, rec) in clinical.items():
        if not images[(patient, side)]:
            summary.skip("no_images_for_clinical_row", f"{sheet.name} row {line}: {patient} {side}")
        for path, view in images[(patient, side)]:
            rows.append(new_row(image_path=path, patient_id=patient, source=SOURCE, view=view, laterality=side,
                                label=label, abnormality=rec.get("abnormality", ""), subtype=rec.get("subtype", "")))
    return rows
