"""``build-tfrecords --runner beam`` (issue 20.5): the same records as the local builder, on Apache Beam.

The Beam build runs embedded (FnApiRunner, 2 worker processes) on 24 small phantoms plus two bad
rows, built into 64x48 records; everything but the timing must equal the local build byte for byte.
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("apache_beam")

from mammodg import cli  # noqa: E402
from mammodg.records.beam import parse_options, run_on_beam  # noqa: E402
from mammodg.records.writer import BuildError, build  # noqa: E402

SETTINGS = ["--set", "preprocess.height=64", "--set", "preprocess.width=48", "--set", "pseudonym_salt=beam-test-salt-16chars",
            "--set", "shard_size=4", "--quiet"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """24 phantoms (6 patients x 4 views, 2 styles) with a file that is not DICOM and a missing one between them."""
    from mammodg.phantom import make_phantoms

    root = tmp_path_factory.mktemp("beam_phantoms")
    path = make_phantoms(root, patients=6, styles=2, seed=3, scale=0.25, progress=False)
    rows = list(csv.DictReader(open(path)))
    (root / "notes.dcm").write_text("this is not DICOM\n" * 50)
    bad = [dict(rows[0], image_path="notes.dcm", patient_id="B1"), dict(rows[0], image_path="missing.dcm", patient_id="B2")]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:5] + bad[:1] + rows[5:17] + bad[1:] + rows[17:])
    return path


def _outputs(out: Path) -> dict:
    """Every file a build leaves (shards, rejects.csv, provenance.csv) as bytes, and dataset.json without its
    timing and the ``workers`` setting (the two builds use different numbers of processes)."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in ("dataset.json", ".build.lock")}
    index = json.loads((out / "dataset.json").read_text())
    index.pop("timing")
    index["config"].pop("workers")
    return files | {"dataset.json": index}


def test_beam_build_equals_local_build(tmp_path, manifest, capsys):
    local, beam = tmp_path / "local", tmp_path / "beam"
    assert cli.main(["build-tfrecords", "--manifest", str(manifest), "--out", str(local), "--workers", "1"] + SETTINGS) == 1
    assert cli.main(["build-tfrecords", "--manifest", str(manifest), "--out", str(beam), "--workers", "2",
                     "--runner", "beam"] + SETTINGS) == 1
    a, b = _outputs(local), _outputs(beam)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    index = a["dataset.json"]
    shards = [k for k in a if k.endswith(".tfrecord")]
    assert index["records"] == 24 and len(shards) >= 6  # every phantom built, several shards per split
    assert index["rejected_by_reason"] == {"not_dicom": 1, "missing_file": 1}
    assert sum(e["count"] for segs in index["splits"].values() for labels in segs.values() for e in labels.values()) == 24
    assert json.loads((beam / "dataset.json").read_text())["timing"]["workers"] == 2
    assert not (beam / "_cache").exists()  # the pickled task chunks and the cache are gone


def test_beam_options():
    flags = parse_options(["runner=FlinkRunner", "flink_master=host:8081", "--save_main_session"], workers=3)
    assert flags == ["--runner=FlinkRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=3",
                     "--flink_master=host:8081", "--save_main_session"]
    assert parse_options([], 2)[:3] == ["--runner=FnApiRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    with pytest.raises(BuildError, match="KEY=VALUE"):
        parse_options(["runner="], 2)


def test_remote_runner_refuses_relative_image_paths(tmp_path, manifest, monkeypatch):
    """Workers on other machines cannot resolve a path relative to the launcher's folder: refused before any work."""
    monkeypatch.chdir(manifest.parent.parent)
    relative = Path(manifest.parent.name) / manifest.name
    with pytest.raises(BuildError, match="relative image path"):
        build(relative, tmp_path / "out", progress=False,
              run_tasks=lambda tasks, workers, progress: run_on_beam(tasks, workers, progress, ["runner=FlinkRunner"]))


def test_cli_errors_are_one_line(tmp_path, manifest, monkeypatch, capsys):
    args = ["build-tfrecords", "--manifest", str(manifest), "--out", str(tmp_path / "o")] + SETTINGS
    assert cli.main(args + ["--beam-option", "runner=FlinkRunner"]) == 2
    assert capsys.readouterr().err.strip() == "mammodg build-tfrecords: error: --beam-option needs --runner beam"
    for option, message in [("runner=NoSuchRunner", "--beam-option runner=NoSuchRunner: Unexpected pipeline runner: NoSuchRunner"),
                            ("direct_num_workers=abc", "--beam-option: argument --direct_num_workers: invalid int value: 'abc'")]:
        assert cli.main(args + ["--runner", "beam", "--beam-option", option]) == 2
        assert capsys.readouterr().err.strip() == f"mammodg build-tfrecords: error: {message}"
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # as if Beam were not installed
    assert cli.main(args + ["--runner", "beam"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'mammodg[beam]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()  # refused before anything was written
