"""The manifest: one CSV row per image (schema in README.md, "Manifest").

Required columns: ``image_path, patient_id, source, label``. Optional: ``manufacturer`` (read from
DICOM when empty), ``view``, ``laterality`` (read from DICOM when empty), ``boxes``, ``birads``,
``density``, ``split``. ``boxes`` lists lesions separated by ``;``, each
``x_min y_min x_max y_max lesion_class [birads]`` in pixel coordinates of the DICOM as stored.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import os
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
    reason: str
    detail: str  # names the line and the column or rule, never a cell value


def parse_boxes(text: str) -> list[Lesion]:
    """Lesions of a ``boxes`` cell; errors name the lesion by position, never echo the cell."""
    lesions = []
    for i, part in enumerate((p.strip() for p in text.split(";")), 1):
        if not part:
            continue
        tok = part.split()
        if len(tok) not in (5, 6):
            raise ValueError(f"boxes, lesion {i}: expected 'x_min y_min x_max y_max lesion_class [birads]'")
        try:
            x0, y0, x1, y1 = (float(t) for t in tok[:4])
        except ValueError:
            raise ValueError(f"boxes, lesion {i}: coordinates must be numbers") from None
        if not (x1 > x0 and y1 > y0 and x0 >= 0 and y0 >= 0):
            raise ValueError(f"boxes, lesion {i}: need 0 <= x_min < x_max and 0 <= y_min < y_max")
        if tok[4] not in LESION_CLASSES:
            raise ValueError(f"boxes, lesion {i}: lesion class must be one of {LESION_CLASSES}")
        birads = tok[5].upper() if len(tok) == 6 else ""
        if birads and birads not in BIRADS:
            raise ValueError(f"boxes, lesion {i}: BI-RADS must be one of {BIRADS}")
        lesions.append(Lesion((x0, y0, x1, y1), tok[4], birads))
    return lesions


def _row(line: int, rec: dict, base: Path) -> Row:
    """One manifest row; a ValueError names the column and the rule, never the cell's value (it may be PHI)."""
    get = lambda k: (rec.get(k) or "").strip()  # noqa: E731
    for k in REQUIRED:
        if not get(k):
            raise ValueError(f"column {k!r} is empty")
    if get("label") not in ("0", "1"):
        raise ValueError("column 'label' must be 0 (benign) or 1 (malignant)")
    view = get("view").upper()
    if view and view not in VIEWS:
        raise ValueError(f"column 'view' must be one of {VIEWS} or empty")
    lat = get("laterality").upper()[:1]
    if get("laterality") and lat not in ("L", "R"):
        raise ValueError("column 'laterality' must be L or R (or left/right) or empty")
    birads = get("birads").upper()
    if birads and birads not in BIRADS:
        raise ValueError(f"column 'birads' must be one of {BIRADS} or empty")
    density = get("density").upper()
    density = {"1": "A", "2": "B", "3": "C", "4": "D"}.get(density, density)
    if density and density not in DENSITIES:
        raise ValueError("column 'density' must be A-D (or 1-4) or empty")
    split = get("split").lower()
    if split and split not in SPLITS:
        raise ValueError(f"column 'split' must be one of {SPLITS} or empty")
    path = Path(get("image_path"))
    return Row(
        line=line, image_path=path if path.is_absolute() else base / path, patient_id=get("patient_id"),
        source=get("source"), label=int(get("label")), manufacturer=get("manufacturer"), view=view,
        laterality=lat, lesions=parse_boxes(get("boxes")), birads=birads, density=density, split=split,
    )


NAME_MAX, PATH_MAX = 255, 4096  # Linux limits on a path component and a whole path, in bytes


def _path_problem(path: Path, root: str | None) -> tuple[str, str] | None:
    """(reason, detail) when ``path`` cannot be used as an image path, else None."""
    raw = os.fsencode(path)
    if len(raw) >= PATH_MAX or any(len(c) > NAME_MAX for c in raw.split(b"/")):
        return "path_too_long", f"image_path is longer than the file system allows ({NAME_MAX} bytes a name, {PATH_MAX} a path)"
    if root is not None:
        real = os.path.realpath(path)
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            return "outside_root", "image_path resolves outside --root ('..', an absolute path or a symbolic link leaving it)"
    return None


def _decode(path: Path) -> str:
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:bom + e.start].count(b"\n") + 1
        raise ManifestError(f"{path}: not UTF-8 at byte offset {bom + e.start} (line {line}); save the manifest as UTF-8") from None


def read_manifest(path: str | Path, root: str | Path | None = None) -> tuple[list[Row], list[BadRow], list[str]]:
    """Parse a manifest; returns (good rows, rejected rows with line numbers, ignored column names).

    Relative image paths are resolved against the manifest's folder. A repeated image path (after
    resolving links) is rejected on every line after its first; with ``root``, paths that resolve
    outside it are rejected. Rejection details never hold cell values or paths.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    real_root = None if root is None else os.path.realpath(root)
    if real_root is not None and not os.path.isdir(real_root):
        raise ManifestError(f"--root {root}: not a directory")
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as e:
        raise ManifestError(f"{path}, line 1: {e}") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ManifestError(f"{path}: missing required column(s) {missing}; header is {header}")
    reader.fieldnames = header
    ignored = [h for h in header if h not in REQUIRED + OPTIONAL]
    rows, bad, first_line = [], [], {}
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a field over csv.field_size_limit(): the file is not a usable table
            raise ManifestError(f"{path}, line {reader.reader.line_num}: {e}") from None
        line = reader.line_num
        if None in rec:
            bad.append(BadRow(line, "malformed_row", f"line {line}: more fields than columns"))
            continue
        try:
            row = _row(line, rec, path.parent)
        except ValueError as e:
            bad.append(BadRow(line, "malformed_row", f"line {line}: {e}"))
            continue
        problem = _path_problem(row.image_path, real_root)
        if problem:
            bad.append(BadRow(line, problem[0], f"line {line}: {problem[1]}"))
            continue
        key = os.path.realpath(row.image_path)
        if key in first_line:
            bad.append(BadRow(line, "duplicate_path", f"line {line}: same image_path as line {first_line[key]}"))
            continue
        first_line[key] = line
        rows.append(row)
    return rows, bad, ignored
