"""CBIS-DDSM (TCIA): the four case-description CSVs + full images and ROI masks -> manifest rows.

Files are found by their case folder (``Mass-Training_P_00001_LEFT_CC`` for the full image,
``..._LEFT_CC_1`` for abnormality 1's mask and crop), so both the UID paths of the CSVs and the
descriptive folders of the NBIA Data Retriever resolve. Mask and crop are told apart by the series
description, else by size (the mask has the full image's size); the CSVs' file names are not trusted
for that, they are swapped in places.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path

from mammodg.io.datasets.common import (DatasetConfig, DatasetError, Summary, birads_of, density_of, fmt_box,
                                        mask_box, new_row, read_table, require, view_of)
from mammodg.io.manifest import BIRADS

SOURCE = "CBIS-DDSM"
CSV_FILES = {  # official file name -> split
    "mass_case_description_train_set.csv": "train",
    "calc_case_description_train_set.csv": "train",
    "mass_case_description_test_set.csv": "test",
    "calc_case_description_test_set.csv": "test",
}
COLUMNS = ("patient_id", "left or right breast", "image view", "abnormality id", "abnormality type",
           "pathology", "assessment", "image file path", "ROI mask file path")
DENSITY_COLUMNS = ("breast density", "breast_density")  # calc CSVs, mass CSVs
EXTRA_COLUMNS = ()
CASE_RX = re.compile(r"^(Mass|Calc)-(Training|Test)_(P_\d+)_(LEFT|RIGHT)_(CC|MLO)(?:_(\d+))?$")
KIND = {"mass": "mass", "calcification": "calc"}
PATHOLOGY = {"MALIGNANT": "malignant", "BENIGN": "benign", "BENIGN_WITHOUT_CALLBACK": "benign"}


def _index_cases(root: Path) -> dict[str, list[Path]]:
    """Case folder name -> its DICOM files, wherever the folder sits below ``root``."""
    cases = collections.defaultdict(list)
    for p in sorted(root.rglob("*.dcm")):
        for part in reversed(p.relative_to(root).parts[:-1]):
            if CASE_RX.match(part):
                cases[part].append(p)
                break
    return cases


def _case_of(path_text: str) -> str:
    return re.split(r"[\\/]", path_text.strip())[0].strip()


def _header(path: Path):
    """The DICOM header, or None when the file cannot be read (reported by the caller)."""
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # pydicom raises several types for broken or non-DICOM files
        return None


def _pick_mask(files: list[Path], shape: tuple[int, int]) -> Path | None:
    """The ROI mask among an abnormality's files (mask and crop may share a series and its description).

    In order: described as a mask and of full-image size; of full-image size and not described as a
    crop; described as a mask (its size is then checked against the image by the caller).
    """
    heads = [(p, ds) for p in files for ds in [_header(p)] if ds is not None]
    size = lambda ds: (int(ds.get("Rows", 0)), int(ds.get("Columns", 0)))  # noqa: E731
    says = lambda ds, word: word in str(ds.get("SeriesDescription", "")).lower()  # noqa: E731
    for test in (lambda ds: says(ds, "mask") and size(ds) == shape,
                 lambda ds: size(ds) == shape and not says(ds, "crop"),
                 lambda ds: says(ds, "mask")):
        hits = [p for p, ds in heads if test(ds)]
        if hits:
            return hits[0]
    return None


def read(root: Path, cfg: DatasetConfig, summary: Summary) -> list[dict]:
    """Manifest rows, one per full mammogram, with every abnormality of every CSV row that names it."""
    import pydicom

    found = [(root / n, s) for n, s in CSV_FILES.items() if (root / n).is_file()]
    if not found:  # one level down, as the TCIA download unpacks
        found = [(p, CSV_FILES[p.name]) for p in sorted(root.rglob("*_case_description_*_set.csv")) if p.name in CSV_FILES]
    if not found:
        raise DatasetError(f"no CBIS-DDSM description CSV under {root}: expected {', '.join(CSV_FILES)}")
    for name in CSV_FILES:
        if name not in {p.name for p, _ in found}:
            summary.skip("missing_description_csv", f"{name} not found under {root}")
    cases = _index_cases(root)
    images: dict[str, dict] = {}  # case folder -> row under construction
    for path, split in found:
        header, recs = read_table(path)
        require(path, header, COLUMNS)
        summary.files_read.append(path.name)
        for line, rec in recs:
            where = f"{path.name} row {line}"
            case = _case_of(rec["image file path"])
            if not CASE_RX.match(case):
                summary.skip("bad_image_file_path", f"{where}: {rec['image file path'][:80]!r}")
                continue
            kind = KIND.get(rec["abnormality type"].lower())
            pathology = PATHOLOGY.get(rec["pathology"].upper())
            if kind is None or pathology is None:
                summary.skip("unknown_abnormality_or_pathology", f"{where}: {rec['abnormality type']!r}, {rec['pathology']!r}")
                continue
            full = cases.get(case, [])
            if len(full) != 1:
                what = "no DICOM file" if not full else f"{len(full)} DICOM files (expected one)"
                summary.skip("image_not_found" if not full else "several_images", f"{where}: {what} in case folder {case}")
                continue
            if case not in images:
                ds = _header(full[0])
                if ds is None or "Rows" not in ds:
                    summary.skip("unreadable_image", f"{where}: {full[0].relative_to(root)} is not a readable DICOM image")
                    continue
                raw = next((rec[c] for c in DENSITY_COLUMNS if c in rec), "")
                density = density_of(raw)
                if not density:
                    summary.note("density_not_1_to_4", f"{where}: {raw!r}; left empty")
                images[case] = {"row": new_row(
                    image_path=full[0], patient_id=rec["patient_id"], source=SOURCE, view=view_of(rec["image view"]),
                    laterality=rec["left or right breast"].upper()[:1], density=density, split=split),
                    "shape": (int(ds.Rows), int(ds.Columns)), "lesions": [], "malignant": False, "birads": []}
            img = images[case]
            img["malignant"] |= pathology == "malignant"
            birads = birads_of(rec["assessment"])
            img["birads"].append(birads)
            roi = _case_of(rec["roi mask file path"])
            if not roi.startswith(case + "_"):  # fall back on the abnormality id
                roi = f"{case}_{rec['abnormality id']}"
            mask = _pick_mask(cases.get(roi, []), img["shape"])
            if mask is None:
                summary.note("roi_mask_not_found", f"{where}: no ROI mask in folder {roi!r}; image kept without this box")
                continue
            try:
                pixels = pydicom.dcmread(mask).pixel_array
            except Exception as e:  # a broken file or a missing decoder
                summary.note("unreadable_roi_mask", f"{where}: {mask.relative_to(root)}: {type(e).__name__}: {e}")
                continue
            if pixels.shape != img["shape"]:
                summary.note("roi_mask_size_differs", f"{where}: mask {pixels.shape} vs image {img['shape']}; box dropped")
                continue
            box = mask_box(pixels)
            if box is None:
                summary.note("empty_roi_mask", f"{where}: {roi}")
                continue
            img["lesions"].append(fmt_box(box, f"{pathology}_{kind}", birads))
    rows = []
    for img in images.values():
        row = img["row"]
        row["label"] = str(int(img["malignant"]))
        row["boxes"] = ";".join(img["lesions"])
        known = [b for b in img["birads"] if b]
        row["birads"] = max(known, key=BIRADS.index) if known else ""
        rows.append(row)
    return rows
