"""What the public-dataset adapters share: their options, metadata tables, boxes, the summary, the writer.

An adapter reads one dataset's official metadata as distributed and returns manifest rows (dicts keyed
by the manifest's columns, ``mammodg.io.manifest``) plus a :class:`Summary` of what it kept and skipped.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import os
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from mammodg.io.atomic import atomic_path
from mammodg.io.manifest import BIRADS, DENSITIES, OPTIONAL, REQUIRED, VIEWS, parse_boxes


@dataclasses.dataclass
class DatasetConfig:
    """Options of ``mammodg manifest`` (``--set name=value``)."""

    # Image label of the datasets without pathology (VinDr-Mammo, INbreast): 1 (malignant) when the
    # BI-RADS category is at least this, and the lesion class of their boxes follows the same rule.
    malignant_birads: str = "4"


class DatasetError(ValueError):
    """The dataset cannot be converted at all (its metadata file is missing or lacks a column)."""


@dataclasses.dataclass
class Summary:
    """What a conversion wrote and what it left out, with reasons (printed by ``mammodg manifest``).

    The printed summary holds counts only; the details, which name files and rows, go to
    ``<manifest>.skipped.csv`` next to the manifest (as ``rejects.csv`` does for a build).
    """

    dataset: str
    files_read: list[str] = dataclasses.field(default_factory=list)
    images: int = 0
    patients: set = dataclasses.field(default_factory=set)
    labels: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    boxes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # rows left out
    notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kept, but something dropped
    details: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (skipped|dropped, reason, detail)
    details_path: Path | None = None

    def skip(self, reason: str, detail: str) -> None:
        """A metadata row or an image left out of the manifest; ``detail`` names the file and row."""
        self.skipped[reason] += 1
        self.details.append(("skipped", reason, detail))

    def note(self, reason: str, detail: str) -> None:
        """Something dropped from a row that is still written (a box, a density value)."""
        self.notes[reason] += 1
        self.details.append(("dropped", reason, detail))

    def add(self, row: dict) -> None:
        self.images += 1
        self.patients.add(row["patient_id"])
        self.labels[row["label"]] += 1
        for les in parse_boxes(row.get("boxes", "")):
            self.boxes[les.lesion_class] += 1

    def write_details(self, path: Path) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["what", "reason", "detail"])
            w.writerows(self.details)
        self.details_path = path

    def format(self) -> str:
        lines = [f"{self.dataset}: read {', '.join(self.files_read) or 'nothing'}",
                 f"  images {self.images}   patients {len(self.patients)}   "
                 f"label 0: {self.labels.get('0', 0)}   label 1: {self.labels.get('1', 0)}",
                 f"  boxes {sum(self.boxes.values())}" + "".join(f"   {k}: {v}" for k, v in sorted(self.boxes.items()))]
        for title, counter in (("rows skipped", self.skipped), ("kept, but dropped or left empty", self.notes)):
            for reason, n in sorted(counter.items()):
                lines.append(f"  {title}: {reason}: {n}")
        if self.details and self.details_path:
            lines.append(f"  details (file, row, what): {self.details_path}")
        return "\n".join(lines)


def norm_key(name: str) -> str:
    """Column names compared loosely: case and surrounding or repeated spaces do not matter."""
    return re.sub(r"\s+", " ", str(name).strip().lower())


def _cell(v) -> str:
    return "" if v is None else str(v).strip()


def _xlsx_rows(path: Path) -> list[list[str]]:
    """Cells of the first sheet of an .xlsx file (standard library only: it is a zip of XML)."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    with zipfile.ZipFile(path) as z:
        shared = []
        if "xl/sharedStrings.xml" in z.namelist():
            root = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))
            shared = ["".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")) for si in root.findall("m:si", ns)]
        sheets = sorted(n for n in z.namelist() if re.fullmatch(r"xl/worksheets/sheet\d+\.xml", n))
        sheet = ElementTree.fromstring(z.read(sheets[0]))
    rows = []
    for r in sheet.iter(f"{{{ns['m']}}}row"):
        cells: dict[int, str] = {}
        for c in r.findall("m:c", ns):
            col = 0
            for ch in re.match(r"[A-Z]+", c.get("r", "A")).group():
                col = col * 26 + ord(ch) - 64
            v = c.find("m:v", ns)
            if c.get("t") == "s" and v is not None:
                text = shared[int(v.text)]
            elif c.get("t") == "inlineStr":
                text = "".join(t.text or "" for t in c.iter(f"{{{ns['m']}}}t"))
            else:
                text = v.text if v is not None else ""
                if re.fullmatch(r"-?\d+\.0", text or ""):
                    text = text[:-2]
            cells[col - 1] = _cell(text)
        rows.append([cells.get(i, "") for i in range(max(cells) + 1)] if cells else [])
    return rows


def read_table(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """A metadata sheet as (header, [(row, {normalised column: value})]); .csv (``,``/``;``/tab) or .xlsx.

    Rows count from 1 at the header, as a spreadsheet shows them (a quoted newline stays in its cell). .xls (old Excel) needs ``xlrd``,
    which is not a dependency: the error says to save the sheet as CSV.
    """
    suffix = path.suffix.lower()
    if suffix == ".xls":
        raise DatasetError(f"{path}: old Excel .xls files are not read (no xlrd); open it in a spreadsheet "
                           f"program and save it as CSV next to it ({path.with_suffix('.csv').name})")
    if suffix == ".xlsx":
        try:
            cells = _xlsx_rows(path)
        except (zipfile.BadZipFile, ElementTree.ParseError, IndexError, KeyError, ValueError) as e:
            raise DatasetError(f"{path}: not a readable .xlsx file ({e}); save it as CSV instead") from None
    else:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        first = text.split("\n", 1)[0]
        delim = max((";", "\t", ","), key=first.count)
        cells = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim))
    if not cells:
        raise DatasetError(f"{path}: empty file")
    header = [_cell(h) for h in cells[0]]
    keys = [norm_key(h) for h in header]
    rows = []
    for i, rec in enumerate(cells[1:], start=2):
        if not any(_cell(v) for v in rec):
            continue
        rows.append((i, {k: _cell(v) for k, v in zip(keys, rec)}))
    return header, rows


def require(path: Path, header: list[str], columns: tuple[str, ...]) -> None:
    """Raise naming the file and the missing official column(s)."""
    have = {norm_key(h) for h in header}
    missing = [c for c in columns if norm_key(c) not in have]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; the header is {header}")


def find_file(root: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` found at ``root`` or below it (distributions nest their top folder)."""
    for name in names:
        if (root / name).is_file():
            return root / name
    for name in names:
        hits = sorted(root.rglob(name))
        if hits:
            return hits[0]
    raise DatasetError(f"{what} not found under {root}: expected {' or '.join(names)}")


def birads_of(text: str) -> str:
    """'BI-RADS 4', '4a', 4.0 -> '4', '4A', '4'; '' when not a BI-RADS category."""
    t = re.sub(r"^BI-?RADS\s*", "", str(text).strip().upper())
    t = re.sub(r"\.0$", "", t)
    return t if t in BIRADS else ""


def density_of(text: str) -> str:
    """'DENSITY C', 'C', '3' -> 'C'; '' when not a density category."""
    t = re.sub(r"^DENSITY\s*", "", str(text).strip().upper())
    t = re.sub(r"\.0$", "", t)
    t = {"1": "A", "2": "B", "3": "C", "4": "D"}.get(t, t)
    return t if t in DENSITIES else ""


def view_of(text: str) -> str:
    """'cc' -> 'CC'; a view the manifest does not name (e.g. 'XCCL') -> 'OTHER'."""
    t = str(text).strip().upper()
    return t if t in VIEWS or not t else "OTHER"


def at_least(birads: str, threshold: str) -> bool:
    """BI-RADS category order of the manifest (0 < 1 < ... < 4 < 4A < 4B < 4C < 5 < 6)."""
    return bool(birads) and BIRADS.index(birads) >= BIRADS.index(threshold)


def check_config(cfg: DatasetConfig) -> None:
    if birads_of(cfg.malignant_birads) != str(cfg.malignant_birads).upper():
        raise DatasetError(f"malignant_birads must be one of {BIRADS}, got {cfg.malignant_birads!r}")
    cfg.malignant_birads = birads_of(cfg.malignant_birads)


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def fmt_box(box, name: str, birads: str = "") -> str:
    """One lesion in the manifest's ``boxes`` syntax: ``x_min y_min x_max y_max name [birads]``."""
    return " ".join([*(_num(float(v)) for v in box), name] + ([birads] if birads else []))


def valid_box(box) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 and 0 <= y0 < y1


def mask_box(mask) -> tuple[int, int, int, int] | None:
    """Bounding box of the non-zero pixels, edges included (pixel i spans [i, i + 1)); None if empty."""
    import numpy as np

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def new_row(**values) -> dict:
    """A manifest row with every column present (empty when not given)."""
    row = {c: "" for c in REQUIRED + OPTIONAL}
    row.update({k: "" if v is None else str(v) for k, v in values.items()})
    return row


def write_manifest(rows: list[dict], out: Path, extra_columns: tuple[str, ...] = ()) -> None:
    """Write the manifest; image paths relative to its folder (links not resolved), so the two can move together."""
    out.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.abspath(out.parent)
    columns = list(REQUIRED + OPTIONAL) + list(extra_columns)
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "image_path": os.path.relpath(os.path.abspath(r["image_path"]), base)})
