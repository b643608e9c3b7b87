"""Adapters for the public mammography datasets: official metadata as distributed -> our manifest.

``convert("cbis-ddsm", root, out)`` reads the dataset under ``root`` and writes ``out`` (README,
"Public datasets"). Each adapter module has ``SOURCE`` (the manifest's ``source``), ``EXTRA_COLUMNS``
and ``read(root, cfg, summary) -> rows``.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from mammodg.io.datasets.common import DatasetConfig, DatasetError, Summary, check_config, write_manifest

DATASETS = {"cbis-ddsm": "cbis_ddsm", "vindr-mammo": "vindr_mammo", "inbreast": "inbreast", "cmmd": "cmmd"}

__all__ = ["DATASETS", "DatasetConfig", "DatasetError", "Summary", "convert"]


def convert(name: str, root: str | Path, out: str | Path, cfg: DatasetConfig | None = None) -> Summary:
    """Write the manifest of dataset ``name`` found under ``root``; returns what was kept and skipped."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    cfg = cfg or DatasetConfig()
    check_config(cfg)
    module = importlib.import_module(f"mammodg.io.datasets.{DATASETS[name]}")
    summary = Summary(module.SOURCE)
    rows = module.read(root, cfg, summary)
    for row in rows:
        summary.add(row)
    out = Path(out)
    write_manifest(rows, out, module.EXTRA_COLUMNS)
    details = out.with_name(f"{out.stem}.skipped.csv")
    if summary.details:
        summary.write_details(details)
    elif details.is_file():  # from an earlier run
        details.unlink()
    return summary
