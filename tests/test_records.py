"""TFRecord builder: encoding, round trip, index counts, split, pseudonyms, bad input, kill + resume."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from mammodg.config import BuildConfig, PreprocessConfig
from mammodg.demo import merge_manifests, real_manifest
from mammodg.io.dicom import read_dicom
from mammodg.io.manifest import read_manifest
from mammodg.preprocess.breast import preprocess
from mammodg.records import schema
from mammodg.records.reader import all_shards, load_index, streams
from mammodg.records.writer import build

SMALL = PreprocessConfig(height=192, width=144)
SALT = "test-salt-16chars"


def _cfg(**kw):
    return BuildConfig(preprocess=SMALL, pseudonym_salt=SALT, workers=2, **kw)


def test_encode_example_matches_tensorflow():
    feats = {"image": b"\x00\x01png", "height": 7, "label": 1, "data_segment": "S1|VendorA",
             "scale": 0.25, "flipped": -3, "boxes/x_min": [1.5, 2.0], "boxes/lesion_class": ["benign_mass", "malignant_calc"],
             "boxes/y_min": []}
    ours = tf.train.Example.FromString(schema.encode_example(feats))
    f = ours.features.feature
    assert f["image"].bytes_list.value == [b"\x00\x01png"]
    assert f["height"].int64_list.value == [7] and f["flipped"].int64_list.value == [-3]
    assert f["data_segment"].bytes_list.value == [b"S1|VendorA"]
    assert f["scale"].float_list.value == [0.25]
    assert list(f["boxes/x_min"].float_list.value) == [1.5, 2.0]
    assert list(f["boxes/lesion_class"].bytes_list.value) == [b"benign_mass", b"malignant_calc"]
    assert f["boxes/y_min"].HasField("float_list") and len(f["boxes/y_min"].float_list.value) == 0
    with pytest.raises(KeyError):
        schema.encode_example({"patient_name": "x"})


def test_model_input_numpy_reference():
    rng = np.random.default_rng(0)
    stored = rng.integers(1, 65536, (20, 16)).astype(np.uint16)
    stored[:, 10:] = 0
    x = schema.model_input(tf.constant(stored[..., None]), 0.25).numpy()[..., 0]
    inside = stored > 0
    np.testing.assert_allclose(x[inside], (stored[inside].astype(np.float64) - 1) / 65534, rtol=1e-6)
    assert np.ptp(x[~inside]) == 0
    assert x.mean() == pytest.approx(0.25, abs=1e-5)


@pytest.fixture(scope="module")
def built(tmp_path_factory, phantoms):
    tmp = tmp_path_factory.mktemp("build")
    manifest = merge_manifests(tmp / "manifest.csv", real_manifest(tmp / "real.csv"), phantoms)
    index = build(manifest, tmp / "out", _cfg(), progress=False)
    return manifest, tmp / "out", index


def _records(out, index):
    recs = []
    for split in index["splits"]:
        for (segment, label), (paths, count) in streams(index, out, split).items():
            n = 0
            for raw in tf.data.TFRecordDataset(paths):
                r = schema.parse(raw)
                recs.append((split, segment, label, r))
                n += 1
            assert n == count, (split, segment, label)
    return recs


def test_round_trip_and_counts(built):
    manifest, out, index = built
    rows, bad, _ = read_manifest(manifest)
    assert not bad and index["rejected"] == 0 and index["records"] == len(rows) > 250
    recs = _records(out, index)
    assert len(recs) == len(rows)
    assert sum(e["count"] for s in index["splits"].values() for g in s.values() for e in g.values()) == len(rows)
    by_id = {}
    for split, segment, label, r in recs:
        assert r["split"].numpy().decode() == split
        assert r["data_segment"].numpy().decode() == segment
        assert int(r["label"]) == label
        by_id[r["image_id"].numpy().decode()] = r
    # parsed images equal the preprocessed arrays exactly (checked on every real image and 40 phantoms)
    from mammodg.records.rows import plan_rows

    tasks, rejected = plan_rows(rows, _cfg(), SALT, out / "_cache")
    assert not rejected
    real = [t for t in tasks if t.row.source == "CBIS-DDSM"]
    assert len(real) == 8
    for t in real + tasks[-40:]:
        d = read_dicom(t.row.image_path)
        boxes = np.array([les.box for les in t.row.lesions], np.float32).reshape(-1, 4)
        ref = preprocess(d.pixels, boxes, pixel_spacing_mm=d.pixel_spacing_mm, height=192, width=144)
        r = by_id[t.image_id]
        np.testing.assert_array_equal(r["image"].numpy()[..., 0], ref.image)
        np.testing.assert_allclose(r["boxes"].numpy(), ref.boxes, rtol=1e-6)
        assert r["manufacturer"].numpy().decode() == (t.row.manufacturer or pydicom_manufacturer(t.row.image_path))
        assert r["laterality"].numpy().decode() == (t.row.laterality or d.laterality)


def pydicom_manufacturer(path):
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).Manufacturer)


def test_segments_from_dicom_manufacturer(built):
    _, out, index = built
    assert "CBIS-DDSM|DDSM-film" in index["segments"]
    assert {s for s in index["segments"] if s.startswith("PHANTOM|")} == {"PHANTOM|VendorA", "PHANTOM|VendorB", "PHANTOM|VendorC"}


def test_split_patient_wise_and_stratified(built):
    _, out, index = built
    recs = _records(out, index)
    patients = {}
    malignant = {}
    for split, segment, label, r in recs:
        p = r["patient"].numpy().decode()
        patients.setdefault(p, set()).add(split)
        malignant[p] = max(malignant.get(p, 0), label)
    assert all(len(s) == 1 for s in patients.values())  # no patient in two splits
    ph = {p: s.pop() for p, s in patients.items() if len(p) == 16}
    for m in (0, 1):
        group = [p for p in ph if malignant[p] == m]
        n_val = sum(ph[p] == "val" for p in group)
        sd = (0.2 * 0.8 * len(group)) ** 0.5  # a per-patient hash threshold: binomial spread
        assert abs(n_val - 0.2 * len(group)) <= 3 * sd + 1


def test_no_phi_in_records(built):
    manifest, out, index = built
    blob = b"".join(Path(p).read_bytes() for s in index["splits"] for p in all_shards(index, out, s))
    blob += (out / "dataset.json").read_bytes()
    rows, _, _ = read_manifest(manifest)
    for pid in {r.patient_id for r in rows}:
        assert pid.encode() not in blob
    assert b"PHANTOM^" not in blob and b"19600101" not in blob and b"P_00173" not in blob


def test_bad_input_rejected_and_good_kept(tmp_path, phantoms):
    from pydicom.data import get_testdata_file

    rows = list(csv.DictReader(open(phantoms)))
    good = rows[:12]
    j2k = next(r for r in rows if r["image_path"].startswith("VendorC"))
    src = phantoms.parent / j2k["image_path"]
    trunc = tmp_path / "truncated_j2k.dcm"
    trunc.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    (tmp_path / "notes.dcm").write_text("this is not DICOM\n" * 50)
    bad = [
        {"image_path": str(trunc), "patient_id": "B1", "source": "X", "label": "0"},
        {"image_path": str(tmp_path / "notes.dcm"), "patient_id": "B2", "source": "X", "label": "0"},
        {"image_path": get_testdata_file("SC_rgb.dcm"), "patient_id": "B3", "source": "X", "label": "0"},
        {"image_path": str(tmp_path / "missing.dcm"), "patient_id": "B4", "source": "X", "label": "0"},
        {"image_path": str(src), "patient_id": "B5", "source": "X", "label": "maybe"},
    ]
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for i, r in enumerate(good):
            if i % 2 == 0 and i // 2 < len(bad):
                w.writerow({k: bad[i // 2].get(k, "") for k in rows[0]})
            r = dict(r, image_path=str(phantoms.parent / r["image_path"]))
            w.writerow(r)
    proc = subprocess.run([sys.executable, "-m", "mammodg.cli", "build-tfrecords", "--manifest", str(manifest),
                           "--out", str(tmp_path / "out"), "--quiet", "--set", "preprocess.height=96",
                           "--set", "preprocess.width=72", "--set", "workers=2"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    index = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert index["records"] == len(good)
    rejects = list(csv.DictReader(open(tmp_path / "out" / "rejects.csv")))
    assert list(rejects[0]) == ["line", "reason", "detail"]  # no path column: paths go to provenance.csv only
    line_of = {}
    for i, r in enumerate(csv.DictReader(open(manifest))):
        line_of.setdefault(r["image_path"], i + 2)
    reasons = {int(r["line"]): r["reason"] for r in rejects}
    assert reasons == {line_of[str(trunc)]: "truncated", line_of[str(tmp_path / "notes.dcm")]: "not_dicom",
                       line_of[get_testdata_file("SC_rgb.dcm")]: "colour", line_of[str(tmp_path / "missing.dcm")]: "missing_file",
                       line_of[str(src)]: "malformed_row"}
    assert "line " in next(r for r in rejects if r["reason"] == "malformed_row")["detail"]
    text = (tmp_path / "out" / "rejects.csv").read_text()
    assert str(tmp_path) not in text and "maybe" not in text  # neither paths nor cell values
    assert "rejected" in proc.stderr and "records written: 12" in proc.stdout
    # a bad manifest as a whole: exit status 2 and a message naming the column
    (tmp_path / "worse.csv").write_text("path,label\nx.dcm,1\n")
    proc = subprocess.run([sys.executable, "-m", "mammodg.cli", "build-tfrecords", "--manifest", str(tmp_path / "worse.csv"),
                           "--out", str(tmp_path / "o2")], capture_output=True, text=True)
    assert proc.returncode == 2 and "image_path" in proc.stderr


def _shard_bytes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*/*.tfrecord"))}


def test_killed_build_resumes_to_identical_shards(tmp_path, phantoms):
    args = ["--manifest", str(phantoms), "--quiet", "--set", "preprocess.height=96", "--set", "preprocess.width=72",
            "--set", f"pseudonym_salt={SALT}", "--set", "workers=1", "--set", "shard_size=16"]
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "mammodg.cli", "build-tfrecords", "--out", str(ref)] + args, check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "mammodg.cli", "build-tfrecords", "--out", str(out)] + args,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "_cache").glob("*.json"))) < 60:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "_cache").glob("*.json")))
    assert 0 < done < 256 and not (out / "dataset.json").exists()
    subprocess.run([sys.executable, "-m", "mammodg.cli", "build-tfrecords", "--out", str(out)] + args, check=True, capture_output=True)
    a, b = _shard_bytes(ref), _shard_bytes(out)
    assert a.keys() == b.keys() and len(a) > 3
    assert all(a[k] == b[k] for k in a)
    assert json.loads((ref / "dataset.json").read_text())["splits"] == json.loads((out / "dataset.json").read_text())["splits"]
    assert not list(out.rglob("*.tmp"))


def test_patient_key_joins_a_patient_listed_in_two_sources(tmp_path):
    """Without ``patient_key`` the same id in sources A and B is two patients (split independently: some land
    in both splits); with ``patient_key: patient_id`` it is one pseudonym and all its rows share one split."""
    from mammodg.io.manifest import Row
    from mammodg.records.rows import plan_rows

    ids = [f"P{i:03d}" for i in range(200)]
    rows = [Row(line=2 + 2 * i + k, image_path=tmp_path / f"{src}{pid}.dcm", patient_id=pid, source=src, label=i % 2)
            for i, pid in enumerate(ids) for k, src in enumerate(("A", "B"))]

    def by_id(cfg):
        tasks, rejected = plan_rows(rows, cfg, SALT, tmp_path)
        assert not rejected and len(tasks) == len(rows)
        out = {}
        for t in tasks:
            out.setdefault(t.row.patient_id, []).append((t.patient, t.split))
        return out

    per_source = by_id(_cfg(val_fraction=0.5))
    assert all(len({p for p, _ in v}) == 2 for v in per_source.values())  # two pseudonyms per id
    split_across = sum(len({s for _, s in v}) == 2 for v in per_source.values())
    assert 60 <= split_across <= 140  # independent splits: about 2 f (1 - f) = 1/2 of the ids (binomial, +-5 sd)
    joined = by_id(_cfg(val_fraction=0.5, patient_key="patient_id"))
    assert all(len(set(v)) == 1 for v in joined.values())  # one pseudonym and one split per id
    assert len({v[0][0] for v in joined.values()}) == len(ids)
    n_val = sum(v[0][1] == "val" for v in joined.values())
    assert abs(n_val - 100) <= 5 * 50 ** 0.5
