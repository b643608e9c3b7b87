"""The manifest: one CSV row per image (schema in README.md, "Manifest").

Required columns: ``image_path, patient_id, source, label``. Optional: ``manufacturer`` (read from
DICOM when empty), ``view``, ``laterality`` (read from DICOM when empty), ``boxes``, ``birads``,
``density``, ``split``. ``boxes`` lists lesions separated by ``;``, each
``x_min y_min x_max y_max lesion_class [birads]`` in pixel coordinates of the DICOM as stored.
"""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

REQUIRED = ("image_path", "patient_id", "source", "label")
OPTIONAL = ("manufacturer", "view", "laterality", "boxes", "birads", "density", "split")
LESION_CLASSES = ("benign_mass", "malignant_mass", "benign_calc", "malignant_calc")
BIRADS = ("0", "1", "2", "3", "4", "4A", "4B", "4C", "5", "6")
DENSITIES = ("A", "B", "C", "D")
VIEWS = ("CC", "MLO", "OTHER")
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """The manifest as a whole is unusable (missing file or required column)."""


@dataclasses.dataclass
class Lesion:
    box: tuple[float, float, float, float]
    lesion_class: str
    birads: str = ""


@dataclasses.dataclass
class Row:
    line: int  # line number in the CSV file (header = 1)
    image_path: Path
    patient_id: str
    source: str
    label: int
    manufacturer: str = ""
    view: str = ""
    laterality: str = ""
    lesions: list[Lesion] = dataclasses.field(default_factory=list)
    birads: str = ""
    density: str = ""
    split: str = ""


@dataclasses.dataclass
class BadRow:
    line: int
    image_path: str
    reason: str
    detail: str


def parse_boxes(text: str) -> list[Lesion]:
    lesions = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        tok = part.split()
        if len(tok) not in (5, 6):
            raise ValueError(f"lesion {part!r}: expected 'x_min y_min x_max y_max lesion_class [birads]'")
        try:
            x0, y0, x1, y1 = (float(t) for t in tok[:4])
        except ValueError:
            raise ValueError(f"lesion {part!r}: coordinates must be numbers") from None
        if not (x1 > x0 and y1 > y0 and x0 >= 0 and y0 >= 0):
            raise ValueError(f"lesion {part!r}: need 0 <= x_min < x_max and 0 <= y_min < y_max")
        if tok[4] not in LESION_CLASSES:
            raise ValueError(f"lesion {part!r}: lesion class must be one of {LESION_CLASSES}")
        birads = tok[5].upper() if len(tok) == 6 else ""
        if birads and birads not in BIRADS:
            raise ValueError(f"lesion {part!r}: BI-RADS must be one of {BIRADS}")
        lesions.append(Lesion((x0, y0, x1, y1), tok[4], birads))
    return lesions


def _row(line: int, rec: dict, base: Path) -> Row:
    get = lambda k: (rec.get(k) or "").strip()  # noqa: E731
    for k in REQUIRED:
        if not get(k):
            raise ValueError(f"column {k!r} is empty")
    if get("label") not in ("0", "1"):
        raise ValueError(f"label must be 0 (benign) or 1 (malignant), got {get('label')!r}")
    view = get("view").upper()
    if view and view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS} or empty, got {view!r}")
    lat = get("laterality").upper()[:1]
    if get("laterality") and lat not in ("L", "R"):
        raise ValueError(f"laterality must be L or R (or left/right) or empty, got {get('laterality')!r}")
    birads = get("birads").upper()
    if birads and birads not in BIRADS:
        raise ValueError(f"birads must be one of {BIRADS} or empty, got {birads!r}")
    density = get("density").upper()
    density = {"1": "A", "2": "B", "3": "C", "4": "D"}.get(density, density)
    if density and density not in DENSITIES:
        raise ValueError(f"density must be A-D (or 1-4) or empty, got {get('density')!r}")
    split = get("split").lower()
    if split and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or empty, got {split!r}")
    path = Path(get("image_path"))
    return Row(
        line=line, image_path=path if path.is_absolute() else base / path, patient_id=get("patient_id"),
        source=get("source"), label=int(get("label")), manufacturer=get("manufacturer"), view=view,
        laterality=lat, lesions=parse_boxes(get("boxes")), birads=birads, density=density, split=split,
    )


def read_manifest(path: str | Path) -> tuple[list[Row], list[BadRow], list[str]]:
    """Parse a manifest; returns (good rows, malformed rows with line numbers, ignored column names).

    Relative image paths are resolved against the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing required column(s) {missing}; header is {header}")
        reader.fieldnames = header
        ignored = [h for h in header if h not in REQUIRED + OPTIONAL]
        rows, bad = [], []
        for rec in reader:
            line = reader.line_num
            if None in rec:
                bad.append(BadRow(line, rec.get("image_path") or "", "malformed_row", f"line {line}: more fields than columns"))
                continue
            try:
                rows.append(_row(line, rec, path.parent))
            except ValueError as e:
                bad.append(BadRow(line, (rec.get("image_path") or "").strip(), "malformed_row", f"line {line}: {e}"))
    return rows, bad, ignored
