"""The builder's CSV reports (``rejects.csv``, ``provenance.csv``): written atomically, every cell
neutralised so that a spreadsheet opening them runs no formula (CSV injection)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from mammodg.io.atomic import atomic_write_text


def csv_cell(value) -> str:
    """A CSV cell that a spreadsheet will not run as a formula (CSV injection): a leading = + - @ tab or CR gets a '."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_csv(path: Path, header: list[str], rows: list[dict], *, private: bool = False) -> None:
    """Write a CSV atomically with every cell neutralised; ``private`` creates it mode 0600 from the start."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([csv_cell(r[k]) for k in header] for r in rows)
    atomic_write_text(path, buf.getvalue(), private=private)
