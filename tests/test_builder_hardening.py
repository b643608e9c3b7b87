"""Builder hardening (issue 21) and traceable records (issue 16.5), each property on tiny DICOMs.

Images are 80x60 synthetic mammograms built into 64x48 records, in this process (workers=1) unless
a test is about the worker pool.
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from test_dicom import _mg  # noqa: E402  (tests/ is on sys.path under pytest)

from mammodg import cli
from mammodg.config import BuildConfig, ConfigError, PreprocessConfig
from mammodg.records import schema
from mammodg.records.reader import load_index
from mammodg.records.split import split_patients
from mammodg.records.verify import ShardError, count_records, verify
from mammodg.records.csvfiles import csv_cell, write_csv
from mammodg.records.shards import BuildError, segment_slug
from mammodg.records.writer import build

SALT = "hardening-test-salt"
FIELDS = ["image_path", "patient_id", "source", "label", "split"]
REPO = Path(__file__).resolve().parent.parent


def _image(path: Path, seed: int, rows: int = 80, cols: int = 60, **tags) -> Path:
    """A half-ellipse 'breast' on the left edge over a dark background; pixels differ per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    breast = (xx / (0.7 * cols)) ** 2 + ((yy - rows / 2) / (0.45 * rows)) ** 2 < 1
    arr = np.where(breast, 2000 + rng.integers(0, 1500, (rows, cols)), rng.integers(0, 60, (rows, cols))).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    _mg(arr, **tags).save_as(path, enforce_file_format=True)
    return path


def _manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})
    return path


def _cfg(**kw) -> BuildConfig:
    kw.setdefault("pseudonym_salt", SALT)
    return BuildConfig(preprocess=PreprocessConfig(height=64, width=48), workers=kw.pop("workers", 1), **kw)


def _simple(tmp_path, n=6, source="S1") -> Path:
    """A manifest of ``n`` distinct images of n // 2 patients, labels alternating."""
    rows = [{"image_path": str(_image(tmp_path / "img" / f"{source}_{i}.dcm", seed=i + 100 * len(source))),
             "patient_id": f"P{i // 2}", "source": source, "label": str(i % 2)} for i in range(n)]
    return _manifest(tmp_path / "m.csv", rows)


def _rejects(out: Path) -> dict[int, dict]:
    return {int(r["line"]): r for r in csv.DictReader(open(out / "rejects.csv"))}


def _ids_in_shards(out: Path) -> list[str]:
    index = load_index(out)
    paths = [out / s["path"] for segs in index["splits"].values() for labels in segs.values()
             for e in labels.values() for s in e["shards"]]
    return [schema.parse(r, decode_image=False)["image_id"].numpy().decode() for r in tf.data.TFRecordDataset([str(p) for p in paths])]


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.err


# --- 16.5 provenance -------------------------------------------------------------------------------

def test_provenance_lists_every_record_once_privately(tmp_path):
    manifest = _simple(tmp_path)
    old = os.umask(0)  # the file must be 0600 whatever the umask: created so, not chmod-ed later
    try:
        index = build(manifest, tmp_path / "out", _cfg(keep_cache=True), progress=False)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    prov = out / "provenance.csv"
    assert stat.S_IMODE(prov.stat().st_mode) == 0o600
    rows = list(csv.DictReader(open(prov)))
    assert list(rows[0]) == ["image_id", "manifest_line", "image_path"]
    ids = _ids_in_shards(out)
    assert len(ids) == index["records"] == 6
    listed = [r["image_id"] for r in rows]
    assert sorted(listed) == sorted(ids) and len(set(listed)) == len(listed)  # each record's id exactly once
    manifest_rows = list(csv.DictReader(open(manifest)))
    for r in rows:  # the line leads back to the manifest row and its path
        assert manifest_rows[int(r["manifest_line"]) - 2]["image_path"] == r["image_path"]
    # paths never inside records, dataset.json or rejects; the ids are stable across a rebuild
    blob = b"".join((out / s).read_bytes() for s in ("dataset.json", "rejects.csv"))
    blob += b"".join(p.read_bytes() for p in out.rglob("*.tfrecord"))
    assert str(tmp_path).encode() not in blob and b"S1_0.dcm" not in blob
    (out / "dataset.json").unlink()
    build(manifest, out, _cfg(), progress=False)
    assert sorted(_ids_in_shards(out)) == sorted(ids)


# --- 1 and 2: shard paths and what a build may delete ----------------------------------------------

def test_segments_differing_in_dropped_characters_get_their_own_folders(tmp_path):
    rows = []
    for j, source in enumerate(["S 1", "S/1", "S_1"]):
        for i in range(2):
            rows.append({"image_path": str(_image(tmp_path / f"{j}_{i}.dcm", seed=10 * j + i)), "patient_id": f"P{j}",
                         "source": source, "label": "0"})
    out = tmp_path / "out"
    index = build(_manifest(tmp_path / "m.csv", rows), out, _cfg(val_fraction=0.0, segment_keys=["source"]), progress=False)
    assert len({segment_slug(s) for s in ("S 1", "S/1", "S_1")}) == 3
    assert index["records"] == 6 and len(index["splits"]["train"]) == 3
    assert verify(out, quick=False) == {"shards": 3, "records": 6}
    assert len(_ids_in_shards(out)) == 6


def test_write_shards_checks_records_on_disk_against_the_index(tmp_path, monkeypatch):
    from mammodg.records import shards

    monkeypatch.setattr(shards, "segment_slug", lambda s: "same")  # the old collision, forced
    rec = schema.encode_example({"label": 0})
    metas = [{"split": "train", "segment": s, "label": 0, "patient": "p", "line": i} for i, s in enumerate(["a", "b"])]
    with pytest.raises(BuildError, match="same"):
        shards.write_shards(tmp_path, metas, lambda m: rec, 4)


def test_rebuild_deletes_only_shards_its_index_listed(tmp_path):
    out = tmp_path / "out"
    stranger = out / "mine" / "x" / "notes.tfrecord"
    stranger.parent.mkdir(parents=True)
    stranger.write_bytes(b"not ours")
    img = [str(_image(tmp_path / f"{i}.dcm", seed=i)) for i in range(4)]
    rows = [{"image_path": p, "patient_id": f"P{i}", "source": "A" if i < 2 else "B", "label": "0"} for i, p in enumerate(img)]
    build(_manifest(tmp_path / "m1.csv", rows), out, _cfg(val_fraction=0.0), progress=False)
    first = {p for p in out.rglob("*.tfrecord")} - {stranger}
    assert len(first) == 2
    build(_manifest(tmp_path / "m2.csv", rows[:2]), out, _cfg(val_fraction=0.0), progress=False)
    now = set(out.rglob("*.tfrecord"))
    assert stranger in now and stranger.read_bytes() == b"not ours"
    assert now - {stranger} < first  # segment B's shard, listed by the earlier index, is gone


# --- 3: duplicates ---------------------------------------------------------------------------------

def test_repeated_path_rejected_and_identical_pixels_reported(tmp_path):
    a = _image(tmp_path / "a.dcm", seed=1)
    b = _image(tmp_path / "b.dcm", seed=2)
    (tmp_path / "sub").mkdir()
    a_copy_other_patient = tmp_path / "a_copy.dcm"
    a_copy_other_patient.write_bytes(a.read_bytes())
    b_copy_same = tmp_path / "b_copy.dcm"
    b_copy_same.write_bytes(b.read_bytes())
    rows = [
        {"image_path": str(a), "patient_id": "P1", "source": "S", "label": "0"},                  # line 2
        {"image_path": "sub/../a.dcm", "patient_id": "P1", "source": "S", "label": "0"},          # 3: same file
        {"image_path": str(a_copy_other_patient), "patient_id": "P2", "source": "S", "label": "1"},  # 4: same pixels
        {"image_path": str(b), "patient_id": "P3", "source": "S", "label": "0"},                  # 5
        {"image_path": str(b_copy_same), "patient_id": "P3", "source": "S", "label": "0"},        # 6: same pixels, same patient
        {"image_path": str(_image(tmp_path / "c.dcm", seed=3)), "patient_id": "P4", "source": "S", "label": "1"},  # 7
    ]
    out = tmp_path / "out"
    index = build(_manifest(tmp_path / "m.csv", rows), out, _cfg(), progress=False)
    rej = _rejects(out)
    assert {k: v["reason"] for k, v in rej.items()} == {3: "duplicate_path", 2: "duplicate_pixels_conflict",
                                                        4: "duplicate_pixels_conflict", 6: "duplicate_pixels"}
    assert "line 2" in rej[3]["detail"] and "2, 4" in rej[4]["detail"]
    assert index["records"] == 2  # lines 5 and 7


# --- 4: stable split -------------------------------------------------------------------------------

def test_split_of_a_patient_depends_only_on_that_patient():
    rng = np.random.default_rng(0)
    patients = {("S", f"{i:016x}"): int(rng.random() < 0.3) for i in range(3000)}
    split = split_patients(patients, 0.2, seed=7)
    bigger = split_patients(patients | {("S", "new-patient"): 1}, 0.2, seed=7)
    assert all(bigger[p] == s for p, s in split.items())  # adding one patient moves nobody
    some = dict(list(patients.items())[:50])
    assert split_patients(some, 0.2, seed=7) == {p: split[p] for p in some}
    for m in (0, 1):  # each stratum keeps the val fraction within binomial spread
        group = [p for p, v in patients.items() if v == m]
        n_val = sum(split[p] == "val" for p in group)
        assert abs(n_val - 0.2 * len(group)) < 3 * (0.16 * len(group)) ** 0.5
    other = split_patients(patients, 0.2, seed=8)
    assert sum(other[p] != split[p] for p in patients) > 300  # the seed matters


def test_manifest_split_column_followed_and_conflicts_rejected(tmp_path):
    img = [str(_image(tmp_path / f"{i}.dcm", seed=i)) for i in range(5)]
    rows = [
        {"image_path": img[0], "patient_id": "P1", "source": "S", "label": "0", "split": "val"},    # 2
        {"image_path": img[1], "patient_id": "P1", "source": "S", "label": "0"},                   # 3 follows line 2
        {"image_path": img[2], "patient_id": "P2", "source": "S", "label": "1", "split": "train"},  # 4
        {"image_path": img[3], "patient_id": "P2", "source": "S", "label": "1", "split": "val"},    # 5 conflict
        {"image_path": img[4], "patient_id": "P3", "source": "S", "label": "0", "split": "test"},   # 6
    ]
    out = tmp_path / "out"
    index = build(_manifest(tmp_path / "m.csv", rows), out, _cfg(val_fraction=0.0), progress=False)
    rej = _rejects(out)
    assert {k: v["reason"] for k, v in rej.items()} == {4: "split_conflict", 5: "split_conflict"}
    assert "lines: 4, 5" in rej[4]["detail"] and "P2" not in rej[4]["detail"]
    assert index["splits"]["val"]["S|UNKNOWN"]["0"]["count"] == 2 and "test" in index["splits"]


# --- 6: shard checks -------------------------------------------------------------------------------

def test_verify_names_a_damaged_shard(tmp_path, capsys):
    out = tmp_path / "out"
    build(_simple(tmp_path), out, _cfg(val_fraction=0.0, shard_size=2), progress=False)
    assert _cli(capsys, "verify", out)[0] == 0
    index = load_index(out)
    entry = index["splits"]["train"]["S1|UNKNOWN"]["0"]["shards"][0]
    assert entry["count"] == 2 and len(entry["sha256"]) == 64 and entry["bytes"] > 0
    shard = out / entry["path"]
    data = shard.read_bytes()
    # one byte flipped inside a record: same size and framing, only the SHA-256 sees it
    shard.write_bytes(data[:40] + bytes([data[40] ^ 1]) + data[41:])
    assert verify(out, quick=True)["records"] == 6
    code, err = _cli(capsys, "verify", out)
    assert code == 2 and entry["path"] in err and "SHA-256" in err and len(err.strip().splitlines()) == 1
    shard.write_bytes(data)
    # a cleanly removed record: a valid TFRecord file with one record less
    first = next(iter(tf.data.TFRecordDataset(str(shard))))
    with tf.io.TFRecordWriter(str(shard)) as w:
        w.write(first.numpy())
    assert count_records(shard) == 1 == len(list(tf.data.TFRecordDataset(str(shard))))
    with pytest.raises(ShardError, match=re.escape(entry["path"]) + ": .* dataset.json lists"):
        verify(out, quick=True)
    shard.write_bytes(data[: len(data) // 2])  # truncated
    code, err = _cli(capsys, "verify", "--quick", out)
    assert code == 2 and entry["path"] in err


# --- 7: allocations the header controls, under a memory limit ----------------------------------------

def test_huge_allocations_rejected_under_memory_limit(tmp_path):
    _image(tmp_path / "ok.dcm", seed=1, PixelSpacing=[0.1, 0.1])
    thin = _mg((np.arange(20000) % 4000).astype(np.uint16).reshape(1, 20000))  # 1 x 20000: 40 KB
    thin.save_as(tmp_path / "thin.dcm", enforce_file_format=True)
    wide = _mg(np.tile(np.arange(4000, dtype=np.uint16), (40, 1)))
    wide.save_as(tmp_path / "wide.dcm", enforce_file_format=True)
    huge = _mg(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    huge.Rows = huge.Columns = 60000  # the header claims 3.6 G pixels
    huge.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    script = textwrap.dedent(f"""
        import json, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
        from pathlib import Path
        from mammodg.config import BuildConfig, PreprocessConfig
        from mammodg.io.manifest import read_manifest
        from mammodg.records.rows import plan_rows, process_row
        tmp = Path({str(tmp_path)!r})
        out = {{}}
        for name, pp in [("ok", {{}}), ("thin", {{}}), ("wide", {{}}), ("huge", {{}}), ("ok", {{"target_spacing_mm": 1e-4}})]:
            (tmp / "m.csv").write_text(f"image_path,patient_id,source,label\\n{{name}}.dcm,P,S,0\\n")
            rows, _, _ = read_manifest(tmp / "m.csv")
            cfg = BuildConfig(preprocess=PreprocessConfig(height=1152, width=832, **pp), pseudonym_salt={SALT!r})
            cache = tmp / "cache"; cache.mkdir(exist_ok=True)
            tasks, _ = plan_rows(rows, cfg, {SALT!r}, cache)
            m = process_row(tasks[0])
            out[name + str(pp)] = m.get("reason", m["status"])
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {
        "ok{}": "ok", "thin{}": "too_small", "wide{}": "bad_aspect_ratio", "huge{}": "too_large",
        "ok{'target_spacing_mm': 0.0001}": "resize_too_large"}


# --- 8: a worker killed by the OS ------------------------------------------------------------------

def test_killed_worker_rejects_its_row_and_the_build_goes_on(tmp_path):
    manifest = _simple(tmp_path, n=6)
    (tmp_path / "killer.py").write_text(textwrap.dedent("""
        import os, signal
        from mammodg.records.rows import process_row

        def process(task):
            if task.row.line == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
            return process_row(task)
    """))
    cache_dir = str(tmp_path / "cache")
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        import killer
        from mammodg.config import BuildConfig, PreprocessConfig
        from mammodg.io.manifest import read_manifest
        from mammodg.records.rows import plan_rows, run_local

        if __name__ == "__main__":
            rows, _, _ = read_manifest({str(manifest)!r})
            cache = Path({cache_dir!r}); cache.mkdir()
            tasks, _ = plan_rows(rows, BuildConfig(preprocess=PreprocessConfig(height=64, width=48)), {SALT!r}, cache)
            run_local(tasks, 2, False, fn=killer.process)
            print(json.dumps({{t.row.line: json.loads((cache / (t.key + ".json")).read_text()).get("reason", "ok") for t in tasks}}))
    """)
    (tmp_path / "run.py").write_text(script)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, env=env, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"2": "ok", "3": "ok", "4": "worker_died", "5": "ok", "6": "ok", "7": "ok"}


# --- 10: one build at a time -----------------------------------------------------------------------

def test_second_concurrent_build_exits_2(tmp_path, capsys):
    manifest = _simple(tmp_path, n=2)
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".build.lock", "a") as held:  # another build holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        code, err = _cli(capsys, "build-tfrecords", "--manifest", manifest, "--out", out, "--quiet", "--set", f"pseudonym_salt={SALT}")
    assert code == 2 and "another build" in err and len(err.strip().splitlines()) == 1
    assert not (out / "dataset.json").exists()
    assert _cli(capsys, "build-tfrecords", "--manifest", manifest, "--out", out, "--quiet", "--set", f"pseudonym_salt={SALT}",
                "--set", "workers=1", "--set", "preprocess.height=64", "--set", "preprocess.width=48")[0] == 0


# --- 11: the salt ----------------------------------------------------------------------------------

def test_salt_rules(tmp_path, capsys):
    from mammodg.records.split import load_or_create_salt

    with pytest.raises(ConfigError, match="16"):
        build(_simple(tmp_path, n=2), tmp_path / "o1", _cfg(pseudonym_salt="short"), progress=False)
    old = os.umask(0)
    try:
        salt = load_or_create_salt(tmp_path / "o2", "")
    finally:
        os.umask(old)
    path = tmp_path / "o2" / ".pseudonym_salt"
    assert len(salt) >= 16 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_salt(tmp_path / "o2", "") == salt and capsys.readouterr().err == ""
    path.chmod(0o644)
    load_or_create_salt(tmp_path / "o2", "")
    assert "0644" in capsys.readouterr().err
    path.write_text("abc\n")
    with pytest.raises(ConfigError, match="3 characters"):
        load_or_create_salt(tmp_path / "o2", "")


# --- 12: what the CSVs hold -------------------------------------------------------------------------

def test_csv_cells_neutralised_and_rejects_hold_no_values(tmp_path):
    for bad in ("=1+2", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(bad) == "'" + bad
    assert csv_cell("P0001") == "P0001" and csv_cell(12) == "12"
    write_csv(tmp_path / "x.csv", ["a"], [{"a": '=HYPERLINK("http://x")'}])
    assert list(csv.reader(open(tmp_path / "x.csv")))[1] == ["'=HYPERLINK(\"http://x\")"]
    secret = "=HYPERLINK(MRN123)"
    rows = [{"image_path": str(_image(tmp_path / "a.dcm", seed=1)), "patient_id": "P1", "source": "S", "label": "0"},
            {"image_path": str(tmp_path / "MRN123_smith.dcm"), "patient_id": "P2", "source": "S", "label": secret},
            {"image_path": str(tmp_path / "MRN456_jones.dcm"), "patient_id": "P3", "source": "S", "label": "0"}]
    build(_manifest(tmp_path / "m.csv", rows), tmp_path / "out", _cfg(), progress=False)
    text = (tmp_path / "out" / "rejects.csv").read_text()
    assert "MRN" not in text and str(tmp_path) not in text
    assert {k: v["reason"] for k, v in _rejects(tmp_path / "out").items()} == {3: "malformed_row", 4: "missing_file"}


# --- 13: one-line errors, exit 2 -------------------------------------------------------------------

def test_clear_errors_exit_2(tmp_path, capsys):
    good = _simple(tmp_path, n=2)
    base = ["build-tfrecords", "--out", tmp_path / "out", "--quiet", "--set", f"pseudonym_salt={SALT}", "--manifest"]

    def fails(manifest, *extra, expect):
        code, err = _cli(capsys, *base, manifest, *extra)
        assert code == 2 and len(err.strip().splitlines()) == 1 and all(e in err for e in expect), err

    latin = tmp_path / "latin1.csv"
    latin.write_bytes("image_path,patient_id,source,label\nx.dcm,Müller,S,0\n".encode("latin-1"))
    offset = latin.read_bytes().index("ü".encode("latin-1"))
    assert offset == 42  # 35 bytes of header line, then "x.dcm,M"
    fails(latin, expect=[str(latin), "byte offset 42", "line 2"])
    huge = tmp_path / "huge.csv"
    huge.write_text("image_path,patient_id,source,label\n" + '"' + "x" * (csv.field_size_limit() + 10) + '",P,S,0\n')
    fails(huge, expect=[str(huge), "line 2", "field larger"])
    fails(good, "--set", "shard_size=0", expect=["shard_size"])
    code, err = _cli(capsys, *base[:2], tmp_path / ("o" * 300), *base[3:], good)  # --out too long for a path
    assert code == 2 and "File name too long" in err and len(err.strip().splitlines()) == 1, err
    fails(good, "--set", "workers=-1", expect=["workers"])
    fails(good, "--set", "segment_keys=[source, scanner]", expect=["scanner", "segment_keys"])
    (tmp_path / "folder.dcm").mkdir()
    (tmp_path / "loop.dcm").symlink_to(tmp_path / "loop.dcm")
    rows = [{"image_path": str(tmp_path / "folder.dcm"), "patient_id": "P1", "source": "S", "label": "0"},
            {"image_path": str(tmp_path / "loop.dcm"), "patient_id": "P2", "source": "S", "label": "0"},
            {"image_path": str(tmp_path / ("n" * 300 + ".dcm")), "patient_id": "P3", "source": "S", "label": "0"}]
    fails(_manifest(tmp_path / "bad.csv", rows), expect=["nothing was built", "3 row(s)"])
    reasons = {k: v["reason"] for k, v in _rejects(tmp_path / "out").items()}
    assert reasons == {2: "is_directory", 3: "symlink_loop", 4: "path_too_long"}


# --- 14: DICOM sanity ------------------------------------------------------------------------------

def test_dicom_sanity_rejections(tmp_path):
    from mammodg.io.dicom import DicomRejected, read_dicom

    def reason(**tags):
        p = _image(tmp_path / "x.dcm", seed=1, **tags)
        try:
            read_dicom(p)
        except DicomRejected as e:
            return e.reason
        return "ok"

    assert reason() == "ok"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that NaN and inf are not valid DS values: that is the point
        for slope in (0, -1, "NaN", "inf"):
            assert reason(RescaleSlope=slope) == "bad_rescale", slope
    ds = _mg(np.arange(80 * 60, dtype=np.uint16).reshape(80, 60) % 4000)
    ds.PixelData = ds.PixelData[:-120]  # 60 pixels short of Rows x Columns
    ds.save_as(tmp_path / "short.dcm", enforce_file_format=True)
    with pytest.raises(DicomRejected) as e:
        read_dicom(tmp_path / "short.dcm")
    assert e.value.reason == "pixel_size_mismatch"
    noise = np.random.default_rng(0).integers(3000, 4000, (80, 60)).astype(np.uint16)
    noise[:4, :4] = 0  # a bright noise field with a dark corner: the mask covers 99.7% of it
    _mg(noise).save_as(tmp_path / "noise.dcm", enforce_file_format=True)
    rows = [{"image_path": str(tmp_path / "noise.dcm"), "patient_id": "P1", "source": "S", "label": "0"},
            {"image_path": str(_image(tmp_path / "burned.dcm", seed=2, BurnedInAnnotation="YES")), "patient_id": "P2", "source": "S", "label": "0"},
            {"image_path": str(_image(tmp_path / "clean.dcm", seed=3, BurnedInAnnotation="NO")), "patient_id": "P3", "source": "S", "label": "0"}]
    manifest = _manifest(tmp_path / "m.csv", rows)
    index = build(manifest, tmp_path / "o1", _cfg(), progress=False)
    assert index["records"] == 2 and {k: v["reason"] for k, v in _rejects(tmp_path / "o1").items()} == {2: "mask_whole_image"}
    assert [w["line"] for w in index["warnings"] if "BurnedInAnnotation" in w["warning"]] == [3]
    index = build(manifest, tmp_path / "o2", _cfg(reject_burned_in=True), progress=False)
    assert index["records"] == 1 and _rejects(tmp_path / "o2")[3]["reason"] == "burned_in_annotation"


# --- 15: --root -----------------------------------------------------------------------------------

def test_root_confines_image_paths(tmp_path):
    root = tmp_path / "root"
    inside = _image(root / "in.dcm", seed=1)
    outside = _image(tmp_path / "out.dcm", seed=2)
    (root / "link.dcm").symlink_to(outside)
    rows = [{"image_path": "in.dcm", "patient_id": "P1", "source": "S", "label": "0"},
            {"image_path": "../out.dcm", "patient_id": "P2", "source": "S", "label": "0"},
            {"image_path": str(outside), "patient_id": "P3", "source": "S", "label": "0"},
            {"image_path": "link.dcm", "patient_id": "P4", "source": "S", "label": "0"},
            {"image_path": str(inside.parent / "sub" / ".." / "in2.dcm"), "patient_id": "P5", "source": "S", "label": "0"}]
    _image(root / "in2.dcm", seed=3)
    (root / "sub").mkdir()
    index = build(_manifest(root / "m.csv", rows), tmp_path / "o", _cfg(), progress=False, root=root)
    assert {k: v["reason"] for k, v in _rejects(tmp_path / "o").items()} == {3: "outside_root", 4: "outside_root", 5: "outside_root"}
    assert index["records"] == 2
    build(_manifest(root / "m.csv", rows), tmp_path / "o2", _cfg(), progress=False)  # no root: only duplicates go
    assert {k: v["reason"] for k, v in _rejects(tmp_path / "o2").items()} == {4: "duplicate_path", 5: "duplicate_path"}
