"""Tests of the synthetic mammography phantom generator (mammodg.phantom)."""
from __future__ import annotations

import csv
import dataclasses
import pathlib

import numpy as np
import pydicom
import pytest

from mammodg import phantom as ph

SCALE = 0.25
SEED = 3
N_PATIENTS = 6
N_STYLES = 5


def _read_manifest(path: pathlib.Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def _mono2(ds: pydicom.Dataset) -> np.ndarray:
    """Stored values -> [0, 1], dense tissue bright (MONOCHROME1 inverted)."""
    a = ds.pixel_array.astype(np.float64)
    maxv = (1 << int(ds.BitsStored)) - 1
    if ds.PhotometricInterpretation == "MONOCHROME1":
        a = maxv - a
    return a / maxv


def _parse_boxes(s: str) -> list[tuple[float, float, float, float, str, str]]:
    out = []
    for item in filter(None, s.split(";")):
        x0, y0, x1, y1, cls, birads = item.split()
        out.append((float(x0), float(y0), float(x1), float(y1), cls, birads))
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    manifest = ph.make_phantoms(out, patients=N_PATIENTS, styles=N_STYLES, seed=SEED, scale=SCALE,
                                source="TESTSRC", progress=False)
    header, rows = _read_manifest(manifest)
    dss = {r["image_path"]: pydicom.dcmread(out / r["image_path"]) for r in rows}
    return out, manifest, header, rows, dss


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms_all")
    manifest = ph.make_phantoms(out, patients=3, styles=3, seed=5, scale=SCALE, all_styles=True,
                                progress=False)
    return out, _read_manifest(manifest)[1]


# ---------------------------------------------------------------------------------------------
def test_default_styles():
    styles = ph.default_styles(N_STYLES)
    assert len({s.name for s in styles}) == N_STYLES
    syntaxes = {str(s.transfer_syntax) for s in styles}
    assert syntaxes == {str(u) for u in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.RLELossless,
                                         pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEGLSLossless,
                                         pydicom.uid.JPEG2000)}
    assert len({s.pixel_spacing_mm for s in styles}) == N_STYLES
    assert len({s.bits_stored for s in styles}) >= 3
    assert all(10 <= s.bits_stored <= 16 for s in styles)
    assert any(s.photometric == "MONOCHROME1" for s in ph.default_styles(2))
    many = ph.default_styles(9)
    assert len({s.name for s in many}) == 9 and many[:N_STYLES] == styles
    assert len(ph.default_styles(1)) == 1
    with pytest.raises(ValueError):
        ph.default_styles(0)


def test_sample_patient_label_distribution():
    n_mal = 0
    for i in range(300):
        left, right = ph.sample_patient(np.random.default_rng([0, i]), i)
        assert (left.laterality, right.laterality) == ("L", "R")
        assert left.density == right.density and 1 <= left.density <= 4
        mal_sides = [b.label for b in (left, right)]
        assert sum(mal_sides) <= 1  # malignant lesion in ONE breast at most
        n_mal += sum(mal_sides)
        for b in (left, right):
            for les in b.lesions:
                assert les.kind in ("mass", "calcification")
                if les.malignant:
                    assert les.birads in ("4B", "4C", "5")
                else:
                    assert les.birads in ("2", "3", "4A")
    assert 0.25 <= n_mal / 300 <= 0.45


def test_manifest_columns_and_rows(dataset):
    out, manifest, header, rows, _ = dataset
    assert manifest == out / "manifest.csv"
    assert header == ["image_path", "patient_id", "source", "manufacturer", "view", "laterality",
                      "label", "boxes", "birads", "density", "split"]
    assert manifest.read_text().splitlines()[0] == ",".join(header)
    assert len(rows) == N_PATIENTS * 4
    styles = ph.default_styles(N_STYLES)
    order = []
    for r in rows:
        assert (out / r["image_path"]).is_file()
        pid = r["patient_id"]
        i = int(pid[2:])
        assert pid == f"PH{i:05d}"
        st = styles[i % N_STYLES]
        assert r["image_path"] == f"{st.name}/{pid}_{r['laterality']}_{r['view']}.dcm"
        assert r["source"] == "TESTSRC" and r["manufacturer"] == "" and r["split"] == ""
        assert r["view"] in ("CC", "MLO") and r["laterality"] in ("L", "R")
        assert r["density"] in ("A", "B", "C", "D")
        boxes = _parse_boxes(r["boxes"])
        classes = [b[4] for b in boxes]
        assert all(c in ph.LESION_CLASSES for c in classes)
        assert r["label"] == ("1" if any(c.startswith("malignant") for c in classes) else "0")
        expected_birads = max([b[5] for b in boxes], key=ph.BIRADS_ORDER.index) if boxes else "1"
        assert r["birads"] == expected_birads
        order.append(([s.name for s in styles].index(st.name), i, r["laterality"], r["view"]))
    assert order == sorted(order)
    # both views of a breast carry the same lesions (CC/MLO matching is possible)
    by_breast: dict = {}
    for r in rows:
        key = (r["patient_id"], r["laterality"])
        by_breast.setdefault(key, []).append(sorted(b[4] for b in _parse_boxes(r["boxes"])))
    assert all(v[0] == v[1] for v in by_breast.values())
    # the small data set contains both labels
    assert {r["label"] for r in rows} == {"0", "1"}


def test_dicom_attributes(dataset):
    _, _, _, rows, dss = dataset
    styles = {s.name: s for s in ph.default_styles(N_STYLES)}
    for r in rows:
        ds = dss[r["image_path"]]
        st = styles[r["image_path"].split("/")[0]]
        assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == st.transfer_syntax
        assert ds.Modality == "MG"
        assert ds.Manufacturer == st.name
        assert ds.ManufacturerModelName
        assert ds.PatientID == r["patient_id"]
        assert str(ds.PatientName) == f"PHANTOM^{r['patient_id']}"
        assert ds.PatientBirthDate == "19600101"
        assert ds.StudyDate
        assert ds.ImageLaterality == r["laterality"] and ds.Laterality == r["laterality"]
        assert ds.ViewPosition == r["view"]
        meaning = {"CC": "cranio-caudal", "MLO": "medio-lateral oblique"}[r["view"]]
        assert ds.ViewCodeSequence[0].CodeMeaning == meaning
        sp = st.pixel_spacing_mm / SCALE
        assert [float(x) for x in ds.PixelSpacing] == pytest.approx([sp, sp], rel=1e-4)
        assert [float(x) for x in ds.ImagerPixelSpacing] == pytest.approx([sp, sp], rel=1e-4)
        assert (ds.Rows, ds.Columns) == st.matrix(SCALE)
        assert ds.SamplesPerPixel == 1 and ds.BitsAllocated == 16 and ds.PixelRepresentation == 0
        assert ds.BitsStored == st.bits_stored and ds.HighBit == st.bits_stored - 1
        assert ds.PhotometricInterpretation == st.photometric
        assert ds.PresentationIntentType == "FOR PRESENTATION"
    uids = [ds.SOPInstanceUID for ds in dss.values()]
    assert len(set(uids)) == len(uids)


def test_pixels_roundtrip_every_syntax(dataset):
    _, _, _, rows, dss = dataset
    styles = {s.name: s for s in ph.default_styles(N_STYLES)}
    seen = set()
    for r in rows:
        st = styles[r["image_path"].split("/")[0]]
        if st.name in seen:
            continue
        seen.add(st.name)
        i = int(r["patient_id"][2:])
        breasts = {b.laterality: b for b in ph.sample_patient(np.random.default_rng([SEED, i]), i)}
        px, _ = ph.render(breasts[r["laterality"]], r["view"], st, scale=SCALE)
        decoded = dss[r["image_path"]].pixel_array
        assert decoded.shape == px.shape
        assert int(px.max()) <= st.max_value
        if st.transfer_syntax in ph.LOSSLESS_SYNTAXES:
            assert decoded.dtype == np.uint16
            np.testing.assert_array_equal(decoded, px)
        else:  # lossy JPEG 2000: decodes, close to the original
            diff = np.abs(decoded.astype(np.float64) - px.astype(np.float64))
            assert diff.mean() < 0.02 * st.max_value
    assert len(seen) == N_STYLES


def test_range_photometric_and_orientation(dataset):
    _, _, _, rows, dss = dataset
    for r in rows:
        ds = dss[r["image_path"]]
        raw = ds.pixel_array.astype(np.float64)
        maxv = (1 << int(ds.BitsStored)) - 1
        assert raw.max() <= maxv
        a = _mono2(ds)
        h, w = a.shape
        assert a.max() > 0.6  # uses most of the range
        # columns next to the chest wall vs. the far 12 % (always background)
        if r["laterality"] == "L":
            wall, far = np.s_[:, : w // 3], np.s_[:, -int(0.12 * w):]
            wall_mid = np.s_[int(0.4 * h): int(0.6 * h), : w // 4]
        else:
            wall, far = np.s_[:, -(w // 3):], np.s_[:, : int(0.12 * w)]
            wall_mid = np.s_[int(0.4 * h): int(0.6 * h), -(w // 4):]
        other = np.s_[:, -(w // 3):] if r["laterality"] == "L" else np.s_[:, : w // 3]
        assert a[wall].mean() > a[other].mean() + 0.05, r["image_path"]
        assert a[far].mean() < 0.12
        # stored (raw) values: MONOCHROME1 keeps the breast darker than the background
        if ds.PhotometricInterpretation == "MONOCHROME1":
            assert raw[wall_mid].mean() < raw[far].mean()
        else:
            assert raw[wall_mid].mean() > raw[far].mean()
    assert {dss[r["image_path"]].PhotometricInterpretation for r in rows} == {"MONOCHROME1", "MONOCHROME2"}


def test_boxes_inside_and_masses_brighter(dataset):
    _, _, _, rows, dss = dataset
    n_mass = 0
    for r in rows:
        ds = dss[r["image_path"]]
        a = _mono2(ds)
        h, w = a.shape
        for x0, y0, x1, y1, cls, _ in _parse_boxes(r["boxes"]):
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            if not cls.endswith("mass"):
                continue
            n_mass += 1
            ix0, iy0, ix1, iy1 = int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))
            bw, bh = ix1 - ix0, iy1 - iy0
            ring = np.zeros(a.shape, bool)
            ring[max(0, iy0 - bh // 2): iy1 + bh // 2, max(0, ix0 - bw // 2): ix1 + bw // 2] = True
            ring[iy0:iy1, ix0:ix1] = False
            ring &= a > 0.15  # breast pixels only
            assert a[iy0:iy1, ix0:ix1].mean() > a[ring].mean(), (r["image_path"], cls)
    assert n_mass > 0


def test_calcifications_are_bright_dots():
    style = ph.default_styles(1)[0]
    breast = ph.Breast(patient_index=0, laterality="L", density=2, texture_seed=1)
    breast.lesions = [ph.Lesion("calcification", True, (55.0, 10.0), 5.0, "4C", -5.0, 7)]
    px, boxes = ph.render(breast, "CC", style, scale=0.3)
    assert [b["lesion_class"] for b in boxes] == ["malignant_calc"]
    x0, y0, x1, y1 = (int(round(v)) for v in boxes[0]["box"])
    a = px.astype(np.float64) / style.max_value
    inside = a[y0:y1, x0:x1]
    assert inside.max() > np.percentile(a[a > 0.15], 99)


def test_density_is_visible():
    style = ph.default_styles(1)[0]
    left, _ = ph.sample_patient(np.random.default_rng([9, 1]), 1)
    means = []
    for density, frac in ((1, 0.07), (4, 0.7)):
        br = dataclasses.replace(left, density=density, gland_fraction=frac, lesions=[])
        a = ph.render(br, "CC", style, scale=0.25)[0].astype(np.float64) / style.max_value
        means.append(a[a > 0.15].mean())
    assert means[1] > means[0] + 0.05


def test_right_is_mirror_geometry():
    style = ph.default_styles(1)[0]
    left, _ = ph.sample_patient(np.random.default_rng([2, 4]), 4)
    right = dataclasses.replace(left, laterality="R")
    pl, bl = ph.render(left, "MLO", style, scale=0.25)
    pr, br = ph.render(right, "MLO", style, scale=0.25)
    w = pl.shape[1]
    # same anatomy, mirrored (noise differs only slightly)
    assert np.corrcoef(pl.astype(float).ravel(), pr[:, ::-1].astype(float).ravel())[0, 1] > 0.95
    for a, b in zip(bl, br):
        assert b["box"] == pytest.approx((w - a["box"][2], a["box"][1], w - a["box"][0], a["box"][3]))


def test_all_styles_same_anatomy(multi):
    out, rows = multi
    styles = ph.default_styles(3)
    assert len(rows) == 3 * 3 * 4
    assert [r["image_path"].split("/")[0] for r in rows] == [s.name for s in styles for _ in range(12)]
    by_image: dict = {}
    for r in rows:
        st = next(s for s in styles if r["image_path"].startswith(s.name + "/"))
        key = (r["patient_id"], r["laterality"], r["view"])
        by_image.setdefault(key, []).append((st, r))
    shapes = {}
    for key, items in by_image.items():
        assert len(items) == 3
        ref = items[0][1]
        for st, r in items:
            assert (r["label"], r["birads"], r["density"]) == (ref["label"], ref["birads"], ref["density"])
            ds = pydicom.dcmread(out / r["image_path"], stop_before_pixels=True)
            shapes.setdefault(st.name, set()).add((ds.Rows, ds.Columns))
        # boxes describe the same physical lesions: centres agree in millimetres
        centres = []
        for st, r in items:
            sp = st.pixel_spacing_mm / SCALE
            bs = _parse_boxes(r["boxes"])
            centres.append(sorted(((b[0] + b[2]) / 2 * sp, (b[1] + b[3]) / 2 * sp, b[4]) for b in bs))
        for c in centres[1:]:
            assert [x[2] for x in c] == [x[2] for x in centres[0]]
            for p, q in zip(c, centres[0]):
                assert abs(p[0] - q[0]) < 4.0 and abs(p[1] - q[1]) < 4.0
    assert len({next(iter(v)) for v in shapes.values()}) == 3  # different matrix sizes


def test_determinism(tmp_path):
    kw = dict(patients=2, styles=3, scale=0.2, progress=False)
    m1 = ph.make_phantoms(tmp_path / "a", seed=7, **kw)
    m2 = ph.make_phantoms(tmp_path / "b", seed=7, **kw)
    m3 = ph.make_phantoms(tmp_path / "c", seed=8, **kw)
    assert m1.read_text() == m2.read_text()
    rows = _read_manifest(m1)[1]
    differs = False
    for r in rows:
        d1 = pydicom.dcmread(m1.parent / r["image_path"])
        d2 = pydicom.dcmread(m2.parent / r["image_path"])
        d3 = pydicom.dcmread(m3.parent / r["image_path"])
        np.testing.assert_array_equal(d1.pixel_array, d2.pixel_array)
        assert d1.SOPInstanceUID == d2.SOPInstanceUID
        assert d1.SOPInstanceUID != d3.SOPInstanceUID
        differs |= d1.pixel_array.shape != d3.pixel_array.shape or not np.array_equal(
            d1.pixel_array, d3.pixel_array)
    assert differs
    # patients do not depend on each other: a 1-patient set equals patient 0 of the 2-patient set
    m4 = ph.make_phantoms(tmp_path / "d", seed=7, patients=1, styles=3, scale=0.2, progress=False)
    rows4 = _read_manifest(m4)[1]
    assert rows4 == [r for r in rows if r["patient_id"] == "PH00000"]
    for r in rows4:
        np.testing.assert_array_equal(pydicom.dcmread(m4.parent / r["image_path"]).pixel_array,
                                      pydicom.dcmread(m1.parent / r["image_path"]).pixel_array)


# ---------------------------------------------------------------------------------------------
# The package's modules, each on its own
def test_manifest_reads_back_with_the_manifest_parser(dataset):
    from mammodg.io.manifest import OPTIONAL, REQUIRED, read_manifest

    out, manifest, header, rows, _ = dataset
    assert sorted(ph.MANIFEST_COLUMNS) == sorted(REQUIRED + OPTIONAL)
    good, bad, ignored = read_manifest(manifest)
    assert bad == [] and ignored == [] and len(good) == len(rows)
    for g, r in zip(good, rows):
        assert g.image_path == out / r["image_path"] and g.label == int(r["label"])
        assert len(g.lesions) == len(_parse_boxes(r["boxes"]))


def test_apply_style_matches_the_formula():
    from mammodg.phantom.styles import apply_style

    s = np.linspace(0, 1, 4096, dtype=np.float32).reshape(64, 64)
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        st = ph.Style("T", gamma=1.3, contrast=0.8, brightness=0.03, pivot=0.4, noise_sigma=0.0,
                      sharpen=0.0, bits_stored=12, photometric=photometric)
        px = apply_style(s.copy(), st, np.random.default_rng(0))
        ref = np.floor(np.clip(0.4 + 0.8 * (s.astype(np.float64) ** 1.3 - 0.4) + 0.03, 0, 1) * 4095 + 0.5)
        if photometric == "MONOCHROME1":
            ref = 4095 - ref
        assert px.dtype == np.uint16
        assert np.abs(px.astype(np.int64) - ref).max() <= 1  # float32 vs float64 rounding


@pytest.mark.parametrize("corr_px", [0.0, 1.0, 2.5])
def test_apply_style_noise_has_the_stated_std(corr_px):
    from mammodg.phantom.styles import apply_style

    level = 0.36  # noise std = noise_sigma * (0.6 + 0.7 * sqrt(level)) = noise_sigma * 1.02
    st = ph.Style("T", noise_sigma=0.02, noise_corr_px=corr_px, bits_stored=16)
    px = apply_style(np.full((256, 256), level, np.float32), st, np.random.default_rng(1))
    std = (px.astype(np.float64) / st.max_value).std()
    assert std == pytest.approx(0.02 * 1.02, rel=0.1)


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_draw_lesions_boxes_the_lesion_where_it_is(laterality):
    from mammodg.phantom.anatomy import Geometry
    from mammodg.phantom.lesions import draw_lesions

    eff, rows, cols = 0.5, 480, 384
    breast = ph.Breast(patient_index=0, laterality=laterality, density=2, cc_offset_mm=6.0)
    breast.lesions = [ph.Lesion("mass", False, (50.0, -10.0), 6.0, "3", 0.0, 11)]
    A = np.ones((rows, cols), np.float32)  # all breast
    boxes = draw_lesions(A, breast, Geometry(breast, "CC"), eff)
    assert [(b["lesion_class"], b["birads"]) for b in boxes] == [("benign_mass", "3")]
    x0, y0, x1, y1 = boxes[0]["box"]
    cx = 50.0 / eff if laterality == "L" else cols - 50.0 / eff  # chest wall at x = 0 for L, = cols for R
    cy = (6.0 - 10.0) / eff + rows / 2
    assert abs((x0 + x1) / 2 - cx) <= 1.0 and abs((y0 + y1) / 2 - cy) <= 1.0
    long_side = max(x1 - x0, y1 - y0)
    assert 2 * 6.0 / eff - 2 <= long_side <= 2 * 6.0 / eff + 2  # the mass's diameter
    assert A.max() > 1.3 and (A > 1).sum() > 0.5 * (x1 - x0) * (y1 - y0)  # drawn into A, in place


def test_write_dicom_round_trips_every_lossless_syntax(tmp_path):
    from mammodg.phantom.dicom_writer import write_dicom

    breast = ph.Breast(patient_index=3, laterality="R", density=1)
    rng = np.random.default_rng(0)
    for st in ph.default_styles(4):  # Explicit VR LE, RLE, JPEG 2000 lossless, JPEG-LS lossless
        assert st.transfer_syntax in ph.LOSSLESS_SYNTAXES
        px = rng.integers(0, st.max_value + 1, size=(64, 48)).astype(np.uint16)
        path = tmp_path / st.name / "x.dcm"
        write_dicom(path, px, style=st, breast=breast, view="MLO", patient_id="PHX", scale=0.5)
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(ds.pixel_array, px)
        assert ds.file_meta.TransferSyntaxUID == st.transfer_syntax
        assert (ds.Rows, ds.Columns, ds.BitsStored) == (64, 48, st.bits_stored)
        assert float(ds.PixelSpacing[0]) == pytest.approx(st.pixel_spacing_mm / 0.5, rel=1e-5)
        assert (ds.ImageLaterality, ds.ViewPosition, ds.PatientID) == ("R", "MLO", "PHX")


def _breast_mono2(px: np.ndarray, style) -> np.ndarray:
    a = px.astype(np.float64) / style.max_value
    return 1 - a if style.photometric == "MONOCHROME1" else a


def test_landmarks_match_the_pixels():
    """The nipple tip is where the breast ends on the nipple's row; the pectoral line separates
    the bright muscle from the breast; the CC chest wall is the image edge."""
    styles = ph.default_styles(5)
    scale = 0.25
    muscle_margin = []
    for i in range(5):
        st = styles[i]
        eff = st.pixel_spacing_mm / scale
        for br in ph.sample_patient(np.random.default_rng([1, i]), i):
            br.lesions = []
            for view in ("CC", "MLO"):
                a = _breast_mono2(ph.render(br, view, st, scale=scale)[0], st)
                rows, cols = a.shape
                lm = ph.landmarks(br, view, st, scale=scale)
                x, y = lm["nipple"]
                left = br.laterality == "L"
                bg = np.median(a[:, -5:] if left else a[:, :5])
                breast_cols = np.nonzero(a[int(y)] > bg + 0.05)[0]
                tip = breast_cols.max() + 1 if left else breast_cols.min()
                assert abs(tip - x) * eff < 1.5, (i, br.laterality, view, tip, x)
                (x0, y0), (x1, y1) = lm["chest_wall"]
                if view == "CC":
                    assert x0 == x1 == (0.0 if left else cols) and (y0, y1) == pytest.approx((0, rows))
                    continue
                p0, p1 = np.array([x0, y0]), np.array([x1, y1])
                assert p0[1] == pytest.approx(0, abs=1) and p1[0] == (0.0 if left else cols)
                d = (p1 - p0) / np.linalg.norm(p1 - p0)
                normal = np.array([-d[1], d[0]])
                if np.dot(np.array([0 if left else cols, 0]) - p0, normal) < 0:
                    normal = -normal  # toward the corner the muscle fills
                sides = []
                for sign in (1, -1):  # 5 mm into the muscle, 5 mm into the breast
                    pts = [p0 + t * (p1 - p0) + sign * normal * 5 / eff for t in np.linspace(0.2, 0.8, 15)]
                    sides.append(np.mean([a[int(q[1]), int(q[0])] for q in pts]))
                muscle_margin.append(sides[0] - sides[1])
    assert min(muscle_margin) > 0 and np.mean(muscle_margin) > 0.05, muscle_margin


def test_landmarks_json(dataset):
    import json

    out, _, _, rows, dss = dataset
    marks = json.loads((out / "landmarks.json").read_text())
    assert list(marks) == [r["image_path"] for r in rows]
    styles = {s.name: s for s in ph.default_styles(N_STYLES)}
    r = rows[-1]
    i = int(r["patient_id"][2:])
    breast = {b.laterality: b for b in ph.sample_patient(np.random.default_rng([SEED, i]), i)}[r["laterality"]]
    st = styles[r["image_path"].split("/")[0]]
    expected = ph.landmarks(breast, r["view"], st, scale=SCALE)
    assert marks[r["image_path"]] == json.loads(json.dumps(expected))
    for r in rows:
        ds = dss[r["image_path"]]
        x, y = marks[r["image_path"]]["nipple"]
        assert 0 < x < ds.Columns and 0 < y < ds.Rows
