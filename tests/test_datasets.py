"""Public-dataset adapters: small replicas of CBIS-DDSM, VinDr-Mammo, INbreast and CMMD as distributed
(official file names, columns and folder layouts, tiny DICOMs) -> ``mammodg manifest`` -> values worked
out by hand; then a replica built into shards with its boxes on the lesions after preprocessing."""
from __future__ import annotations

import csv
import plistlib
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mammodg.cli import main
from mammodg.io.manifest import read_manifest
from mammodg.phantom import Breast, default_styles, write_dicom

STYLE = default_styles(1)[0]  # Explicit VR Little Endian, MONOCHROME2, 12 bits
ROWS, COLS = 96, 64
BREAST, LESION = 1500, 3900


def mammo(lat: str, lesions=()) -> np.ndarray:
    """A breast (half ellipse at the chest wall) on a dark background, with bright rectangles (r0, c0, r1, c1)."""
    y, x = np.mgrid[:ROWS, :COLS]
    xc = x if lat == "L" else COLS - 1 - x
    img = np.where((xc / (0.8 * COLS)) ** 2 + ((y - ROWS / 2) / (0.47 * ROWS)) ** 2 < 1, BREAST, 40)
    for r0, c0, r1, c1 in lesions:
        img[r0:r1, c0:c1] = LESION
    return img.astype(np.uint16)


def dicom(path: Path, pixels: np.ndarray, lat: str = "L", view: str = "CC", **tags) -> Path:
    """Write an MG DICOM with the phantom writer, then set (or, with None, delete) dataset-specific tags."""
    write_dicom(path, pixels, style=STYLE, breast=Breast(0, lat, 2), view=view, patient_id="anon")
    if tags:
        ds = pydicom.dcmread(path)
        for k, v in tags.items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


def run_manifest(name: str, root: Path, out: Path, *sets: str, key=lambda r: Path(r["image_path"]).name) -> tuple[int, dict]:
    """``mammodg manifest``; returns its exit status and the written rows by ``key`` (default: file name)."""
    argv = ["manifest", "--from", name, "--root", str(root), "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    rc = main(argv)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len({key(r) for r in rows}) == len(rows)
    return rc, {key(r): r for r in rows}


# ---------------------------------------------------------------------------------------------- CBIS-DDSM
MASS_HEADER = ["patient_id", "breast_density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "mass shape", "mass margins", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]
CALC_HEADER = ["patient_id", "breast density", "left or right breast", "image view", "abnormality id",
               "abnormality type", "calc type", "calc distribution", "assessment", "pathology", "subtlety",
               "image file path", "cropped image file path", "ROI mask file path"]
U = "1.3.6.1.4.1.9590.100.1.2."


def _mask(r0, c0, r1, c1) -> np.ndarray:
    m = np.zeros((ROWS, COLS), np.uint16)
    m[r0:r1, c0:c1] = 255
    return m


def _crop() -> np.ndarray:
    return np.full((12, 10), 3000, np.uint16)


@pytest.fixture(scope="module")
def cbis(tmp_path_factory) -> Path:
    """Three cases: one in the UID layout the CSVs name (its mask and crop file names swapped, as in
    places in the archive), two in the NBIA Data Retriever's descriptive layout."""
    root = tmp_path_factory.mktemp("cbis")
    top = root / "CBIS-DDSM"
    # 1. Mass-Training P_00001 LEFT CC, classic UID layout, two abnormalities.
    case = "Mass-Training_P_00001_LEFT_CC"
    full1 = f"{case}/{U}11/{U}12/000000.dcm"
    dicom(top / full1, mammo("L", [(40, 10, 50, 20), (20, 5, 26, 13)]), SeriesDescription="full mammogram images", PatientID=case)
    roi1 = f"{case}_1/{U}21/{U}22"
    dicom(top / roi1 / "000000.dcm", _crop(), SeriesDescription="cropped images")
    dicom(top / roi1 / "000001.dcm", _mask(40, 10, 50, 20), SeriesDescription="ROI mask images")
    roi2 = f"{case}_2/{U}31/{U}32"  # no series descriptions: told apart by size
    dicom(top / roi2 / "000000.dcm", _mask(20, 5, 26, 13), SeriesDescription=None)
    dicom(top / roi2 / "000001.dcm", _crop(), SeriesDescription=None)
    # 2. Mass-Training P_00002 RIGHT MLO, NBIA layout, mask and crop in one series (one description).
    case = "Mass-Training_P_00002_RIGHT_MLO"
    dicom(top / case / "07-20-2016-DDSM-12345" / "1.000000-full mammogram images-24515" / "1-1.dcm",
          mammo("R", [(30, 44, 40, 54)]), "R", "MLO", SeriesDescription="full mammogram images")
    series = top / f"{case}_1" / "07-21-2016-DDSM-41500" / "1.000000-ROI mask images-35207"
    dicom(series / "1-1.dcm", _crop(), SeriesDescription="ROI mask images")
    dicom(series / "1-2.dcm", _mask(30, 44, 40, 54), SeriesDescription="ROI mask images")
    # 3. Calc-Test P_00038 LEFT MLO, NBIA layout; abnormality 2's mask folder is missing.
    case = "Calc-Test_P_00038_LEFT_MLO"
    dicom(top / case / "08-29-2017-DDSM-96009" / "1.000000-full mammogram images-63992" / "1-1.dcm",
          mammo("L", [(60, 20, 68, 26)]), "L", "MLO", SeriesDescription="full mammogram images")
    study = top / f"{case}_1" / "08-29-2017-DDSM-73218"
    dicom(study / "1.000000-ROI mask images-11111" / "1-1.dcm", _mask(60, 20, 68, 26), SeriesDescription="ROI mask images")
    dicom(study / "1.000000-cropped images-22222" / "1-1.dcm", _crop(), SeriesDescription="cropped images")

    write_csv(root / "mass_case_description_train_set.csv", MASS_HEADER, [
        ["P_00001", 3, "LEFT", "CC", 1, "mass", "IRREGULAR", "SPICULATED", 4, "MALIGNANT", 4,
         full1, f"Mass-Training_P_00001_LEFT_CC_1/{U}21/{U}22/000001.dcm",
         f"Mass-Training_P_00001_LEFT_CC_1/{U}21/{U}22/000000.dcm\n"],  # names swapped; newline in cell
        ["P_00001", 3, "LEFT", "CC", 2, "mass", "OVAL", "CIRCUMSCRIBED", 3, "BENIGN_WITHOUT_CALLBACK", 2,
         full1, f"Mass-Training_P_00001_LEFT_CC_2/{U}31/{U}32/000001.dcm",
         f"Mass-Training_P_00001_LEFT_CC_2/{U}31/{U}32/000000.dcm"],
        ["P_00002", 2, "RIGHT", "MLO", 1, "mass", "ROUND", "OBSCURED", 2, "BENIGN", 3,
         f"Mass-Training_P_00002_RIGHT_MLO/{U}41/{U}42/000000.dcm",
         f"Mass-Training_P_00002_RIGHT_MLO_1/{U}51/{U}52/000000.dcm",
         f"Mass-Training_P_00002_RIGHT_MLO_1/{U}51/{U}52/000001.dcm"],
    ])
    write_csv(root / "mass_case_description_test_set.csv", MASS_HEADER, [])
    write_csv(root / "calc_case_description_test_set.csv", CALC_HEADER, [
        ["P_00038", 4, "LEFT", "MLO", 1, "calcification", "PLEOMORPHIC", "CLUSTERED", 5, "MALIGNANT", 5,
         f"Calc-Test_P_00038_LEFT_MLO/{U}61/{U}62/000000.dcm", f"Calc-Test_P_00038_LEFT_MLO_1/{U}71/{U}72/000000.dcm",
         f"Calc-Test_P_00038_LEFT_MLO_1/{U}71/{U}72/000001.dcm"],
        ["P_00038", 4, "LEFT", "MLO", 2, "calcification", "PUNCTATE", "CLUSTERED", 2, "BENIGN", 2,
         f"Calc-Test_P_00038_LEFT_MLO/{U}61/{U}62/000000.dcm", f"Calc-Test_P_00038_LEFT_MLO_2/{U}81/{U}82/000000.dcm",
         f"Calc-Test_P_00038_LEFT_MLO_2/{U}81/{U}82/000001.dcm"],
        ["P_00099", 1, "RIGHT", "CC", 1, "calcification", "AMORPHOUS", "SEGMENTAL", 4, "MALIGNANT", 3,
         f"Calc-Test_P_00099_RIGHT_CC/{U}91/{U}92/000000.dcm", f"Calc-Test_P_00099_RIGHT_CC_1/{U}93/{U}94/000000.dcm",
         f"Calc-Test_P_00099_RIGHT_CC_1/{U}93/{U}94/000001.dcm"],
    ])
    # calc_case_description_train_set.csv is left out on purpose: reported, the rest converted.
    return root


def test_cbis_ddsm(cbis, tmp_path, capsys):
    rc, recs = run_manifest("cbis-ddsm", cbis, tmp_path / "m.csv", key=lambda r: r["patient_id"])
    out = capsys.readouterr().out
    assert rc == 1  # rows were skipped (the missing image, the missing CSV)
    assert set(recs) == {"P_00001", "P_00002", "P_00038"}
    a, b, c = recs["P_00001"], recs["P_00002"], recs["P_00038"]
    assert (a["view"], a["laterality"], a["label"], a["birads"], a["density"], a["split"]) == ("CC", "L", "1", "4", "C", "train")
    assert a["boxes"] == "10 40 20 50 malignant_mass 4;5 20 13 26 benign_mass 3"
    assert (b["view"], b["laterality"], b["label"], b["birads"], b["density"], b["split"]) == ("MLO", "R", "0", "2", "B", "train")
    assert b["boxes"] == "44 30 54 40 benign_mass 2"
    assert (c["view"], c["laterality"], c["label"], c["birads"], c["density"], c["split"]) == ("MLO", "L", "1", "5", "D", "test")
    assert c["boxes"] == "20 60 26 68 malignant_calc 5"  # abnormality 2 has no mask: no box, still counted in the label
    assert {r["source"] for r in recs.values()} == {"CBIS-DDSM"}
    assert Path(tmp_path / a["image_path"]).resolve() == (cbis / "CBIS-DDSM/Mass-Training_P_00001_LEFT_CC" / f"{U}11/{U}12/000000.dcm").resolve()
    assert "Mass-Training_P_00002_RIGHT_MLO/07-20-2016-DDSM-12345" in b["image_path"]
    manifest_rows, bad, _ = read_manifest(tmp_path / "m.csv")  # what build-tfrecords reads
    assert not bad and len(manifest_rows) == 3
    assert "image_not_found: 1" in out and "missing_description_csv: 1" in out and "roi_mask_not_found: 1" in out
    assert "images 3   patients 3   label 0: 1   label 1: 2" in out
    assert "P_000" not in out  # counts only on the terminal; the details, naming rows, in a file
    with open(tmp_path / "m.skipped.csv", newline="") as f:
        details = {r["reason"]: r["detail"] for r in csv.DictReader(f)}
    assert details["image_not_found"].startswith("calc_case_description_test_set.csv row 4: no DICOM file")
    assert details["roi_mask_not_found"].startswith("calc_case_description_test_set.csv row 3:")


def test_cbis_ddsm_real_full_image(real_cases, tmp_path):
    """A real CBIS-DDSM full image (RLE, Secondary Capture, 4736x2624) in the NBIA layout, with a mask of its size."""
    real = next(p for case, _, p in real_cases if pydicom.dcmread(p, stop_before_pixels=True).PatientID == "Mass-Test_P_00820_LEFT_CC")
    case = "Mass-Test_P_00820_LEFT_CC"
    full = tmp_path / "CBIS-DDSM" / case / "01-04-2017-DDSM-NA-12345" / "1.000000-full mammogram images-67890" / "1-1.dcm"
    full.parent.mkdir(parents=True)
    full.symlink_to(real)
    mask = np.zeros((4736, 2624), np.uint16)
    mask[2000:2301, 700:951] = 255
    series = tmp_path / "CBIS-DDSM" / f"{case}_1" / "01-04-2017-DDSM-NA-23456" / "1.000000-ROI mask images-34567"
    dicom(series / "1-1.dcm", mask, SeriesDescription="ROI mask images")
    dicom(series / "1-2.dcm", _crop(), SeriesDescription="ROI mask images")
    write_csv(tmp_path / "mass_case_description_test_set.csv", MASS_HEADER, [
        ["P_00820", 2, "LEFT", "CC", 1, "mass", "IRREGULAR", "ILL_DEFINED", 5, "MALIGNANT", 5,
         f"{case}/{U}1/{U}2/000000.dcm", f"{case}_1/{U}3/{U}4/000000.dcm", f"{case}_1/{U}3/{U}4/000001.dcm"]])
    _, rows = run_manifest("cbis-ddsm", tmp_path, tmp_path / "m.csv", key=lambda r: r["patient_id"])
    r = rows["P_00820"]
    assert (r["boxes"], r["label"], r["split"], r["view"], r["laterality"], r["density"]) == ("700 2000 951 2301 malignant_mass 5", "1", "test", "CC", "L", "B")
    assert r["image_path"] == str(full.relative_to(tmp_path))  # the dataset's own path, the link kept


def test_cbis_ddsm_broken_files_reported(tmp_path, capsys):
    """A non-DICOM full image skips its rows; an unreadable mask drops its box; the rest is written."""
    a, b = "Mass-Training_P_00003_LEFT_CC", "Mass-Training_P_00004_RIGHT_CC"
    (tmp_path / a / "s" / "s").mkdir(parents=True)
    (tmp_path / a / "s" / "s" / "000000.dcm").write_bytes(b"not a dicom file")
    dicom(tmp_path / b / "s" / "s" / "000000.dcm", mammo("R", [(30, 44, 40, 54)]), "R")
    (tmp_path / f"{b}_1" / "s" / "s").mkdir(parents=True)
    (tmp_path / f"{b}_1" / "s" / "s" / "000000.dcm").write_bytes(b"\0" * 200)
    write_csv(tmp_path / "mass_case_description_train_set.csv", MASS_HEADER, [
        ["P_00003", 1, "LEFT", "CC", 1, "mass", "OVAL", "CIRCUMSCRIBED", 4, "MALIGNANT", 3,
         f"{a}/s/s/000000.dcm", f"{a}_1/s/s/000000.dcm", f"{a}_1/s/s/000001.dcm"],
        ["P_00004", 1, "RIGHT", "CC", 1, "mass", "OVAL", "CIRCUMSCRIBED", 4, "MALIGNANT", 3,
         f"{b}/s/s/000000.dcm", f"{b}_1/s/s/000001.dcm", f"{b}_1/s/s/000000.dcm"],
    ])
    rc, rows = run_manifest("cbis-ddsm", tmp_path, tmp_path / "m.csv", key=lambda r: r["patient_id"])
    out = capsys.readouterr().out
    assert rc == 1 and set(rows) == {"P_00004"} and rows["P_00004"]["boxes"] == "" and rows["P_00004"]["label"] == "1"
    assert "unreadable_image: 1" in out and "roi_mask_not_found: 1" in out


# ---------------------------------------------------------------------------------------------- VinDr-Mammo
BREAST_HEADER = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                 "breast_birads", "breast_density", "split"]
FINDING_HEADER = ["study_id", "series_id", "image_id", "laterality", "view_position", "height", "width",
                  "breast_birads", "breast_density", "finding_categories", "finding_birads",
                  "xmin", "ymin", "xmax", "ymax", "split"]
SA, SB = "4e3a578fd8a2f1b8ea4e1b6a5e7bf5a0", "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"


@pytest.fixture(scope="module")
def vindr(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vindr") / "vindr-mammo" / "1.0.0"
    imgs = {  # image id -> (study, laterality, view, lesions drawn)
        "a_lcc": (SA, "L", "CC", [(41, 11, 50, 20), (20, 5, 26, 13)]),
        "a_lmlo": (SA, "L", "MLO", [(30, 8, 38, 18)]),
        "b_rcc": (SB, "R", "CC", []),
    }
    for iid, (study, lat, view, les) in imgs.items():
        dicom(root / "images" / study / f"{iid}.dicom", mammo(lat, les), lat, view)
    meta = lambda iid, study, lat, view, birads, dens, split: [study, "ser", iid, lat, view, ROWS, COLS, birads, dens, split]  # noqa: E731
    write_csv(root / "breast-level_annotations.csv", BREAST_HEADER, [
        meta("a_lcc", SA, "L", "CC", "BI-RADS 4", "DENSITY C", "training"),
        meta("a_lmlo", SA, "L", "MLO", "BI-RADS 4", "DENSITY C", "training"),
        meta("b_rcc", SB, "R", "CC", "BI-RADS 2", "DENSITY B", "test"),
        meta("b_rmlo", SB, "R", "MLO", "BI-RADS 2", "DENSITY B", "test"),  # its file is missing
    ])
    f = lambda iid, study, lat, view, cats, birads, *box: [study, "ser", iid, lat, view, ROWS, COLS, "BI-RADS 4", "DENSITY C", cats, birads, *box, "training"]  # noqa: E731
    write_csv(root / "finding_annotations.csv", FINDING_HEADER, [
        f("a_lcc", SA, "L", "CC", "['Mass']", "BI-RADS 4", 10.5, 40.25, 20.75, 50.0),
        f("a_lcc", SA, "L", "CC", "['Suspicious Calcification']", "BI-RADS 3", 5.0, 20.0, 13.0, 26.0),
        f("a_lmlo", SA, "L", "MLO", "['Mass', 'Architectural Distortion']", "BI-RADS 5", 8.0, 30.0, 18.0, 38.0),
        f("a_lmlo", SA, "L", "MLO", "['Focal Asymmetry']", "BI-RADS 3", 40.0, 10.0, 70.0, 20.0),  # past the edge
        f("b_rcc", SB, "R", "CC", "['No Finding']", "", "", "", "", ""),
    ])
    return root


def test_vindr_mammo(vindr, tmp_path, capsys):
    rc, rows = run_manifest("vindr-mammo", vindr.parent.parent, tmp_path / "m.csv")
    out = capsys.readouterr().out
    assert rc == 1 and set(rows) == {"a_lcc.dicom", "a_lmlo.dicom", "b_rcc.dicom"}
    a, m, b = rows["a_lcc.dicom"], rows["a_lmlo.dicom"], rows["b_rcc.dicom"]
    assert (a["patient_id"], a["view"], a["laterality"], a["label"], a["birads"], a["density"], a["split"]) == (SA, "CC", "L", "1", "4", "C", "train")
    assert a["boxes"] == "10.5 40.25 20.75 50 malignant_mass 4;5 20 13 26 benign_calc 3" and a["other_findings"] == ""
    assert m["boxes"] == "8 30 18 38 malignant_mass 5"
    assert m["other_findings"] == "8 30 18 38 Architectural_Distortion 5;40 10 64 20 Focal_Asymmetry 3"
    assert (b["label"], b["birads"], b["density"], b["split"], b["boxes"], b["other_findings"]) == ("0", "2", "B", "test", "", "")
    assert "finding_box_clipped_to_image: 1" in out and "image_not_found: 1" in out
    # the label rule is configurable: only BI-RADS 5 malignant
    _, rows5 = run_manifest("vindr-mammo", vindr, tmp_path / "m5.csv", "malignant_birads=5")
    assert rows5["a_lcc.dicom"]["label"] == "0" and rows5["a_lmlo.dicom"]["label"] == "0"
    assert rows5["a_lcc.dicom"]["boxes"].startswith("10.5 40.25 20.75 50 benign_mass 4;")
    assert rows5["a_lmlo.dicom"]["boxes"] == "8 30 18 38 malignant_mass 5"


# ---------------------------------------------------------------------------------------------- INbreast
def _roi(name: str, points: list[tuple[float, float]]) -> dict:
    return {"Area": 1.0, "Center": "(0, 0)", "IndexInImage": 0, "Name": name, "NumberOfPoints": len(points),
            "Point_mm": [f"({x * 0.07:.3f}, {y * 0.07:.3f}, 0)" for x, y in points],
            "Point_px": [f"({x:.2f}, {y:.2f})" for x, y in points], "Type": 15 if len(points) > 1 else 0}


@pytest.fixture(scope="module")
def inbreast(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inbreast") / "INbreast Release 1.0"
    dicom(root / "AllDICOMs" / "22678622_6c613a14b80a8591_MG_L_CC_ANON.dcm", mammo("L", [(40, 10, 50, 20), (20, 5, 26, 13)]))
    dicom(root / "AllDICOMs" / "22678646_6c613a14b80a8591_MG_L_ML_ANON.dcm", mammo("L"), "L", "MLO")
    dicom(root / "AllDICOMs" / "53586896_b231a8f7d1c4e2a3_MG_R_CC_ANON.dcm", mammo("R", [(50, 40, 60, 50)]), "R")
    plist = {"Images": [{"ImageHeight": ROWS, "ImageIndex": 0, "ImageWidth": COLS, "NumberOfROIs": 4, "ROIs": [
        _roi("Mass", [(10, 40), (19.5, 41), (20, 50), (12, 49.5)]),
        _roi("Calcification", [(30.2, 60.1)]),
        _roi("Cluster", [(5, 20), (13, 20), (13, 26), (5, 26)]),
        _roi("Spiculated Region", [(30, 30), (36, 30), (36, 34)]),
    ]}]}
    (root / "AllXML").mkdir(parents=True)
    (root / "AllXML" / "22678622.xml").write_bytes(plistlib.dumps(plist, fmt=plistlib.FMT_XML))
    plist2 = {"Images": [{"ImageIndex": 0, "NumberOfROIs": 2, "ROIs": [
        _roi("Mass", [(40, 50), (50, 50), (50, 60), (40, 60)]), _roi("Calcification", [(45, 70)])]}]}
    (root / "AllXML" / "53586896.xml").write_bytes(plistlib.dumps(plist2, fmt=plistlib.FMT_XML))
    head = ["Patient ID", "Patient age", "Laterality", "View", "Acquisition date", "File Name", "ACR", "Bi-Rads"]
    write_csv(root / "INbreast.csv", head, [
        ["removed", "removed", "L", "CC", "201001", "22678622", "3", "4c"],
        ["removed", "removed", "L", "MLO", "201001", "22678646", "3", "4c"],
        ["removed", "removed", "R", "CC", "200902", "53586896", "1", "2"],
        ["removed", "removed", "R", "MLO", "200902", "53586920", "1", "2"],  # no such DICOM
        ["", "", "", "", "", "", "", ""],
    ], delimiter=";")
    return root


def test_inbreast(inbreast, tmp_path, capsys):
    rc, rows = run_manifest("inbreast", inbreast.parent, tmp_path / "m.csv")
    out = capsys.readouterr().out
    assert rc == 1 and len(rows) == 3
    a = rows["22678622_6c613a14b80a8591_MG_L_CC_ANON.dcm"]
    m = rows["22678646_6c613a14b80a8591_MG_L_ML_ANON.dcm"]
    r = rows["53586896_b231a8f7d1c4e2a3_MG_R_CC_ANON.dcm"]
    assert (a["patient_id"], a["view"], a["laterality"], a["label"], a["birads"], a["density"]) == ("6c613a14b80a8591", "CC", "L", "1", "4C", "C")
    assert a["boxes"] == "10 40 20 50 malignant_mass 4C;5 20 13 26 malignant_calc 4C"
    assert a["other_findings"] == "30 30 36 34 Spiculated_Region 4C"
    assert (m["view"], m["label"], m["boxes"]) == ("MLO", "1", "")
    assert (r["patient_id"], r["laterality"], r["label"], r["birads"], r["density"], r["boxes"]) == ("b231a8f7d1c4e2a3", "R", "0", "2", "A", "40 50 50 60 benign_mass 2")
    assert "single_calcification_dropped: 2" in out and "image_not_found: 1" in out


def test_inbreast_xls_needs_csv(tmp_path):
    (tmp_path / "INbreast.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    assert main(["manifest", "--from", "inbreast", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    assert not (tmp_path / "m.csv").exists()


# ---------------------------------------------------------------------------------------------- CMMD
def write_xlsx(path: Path, rows: list[list]) -> None:
    """A minimal .xlsx (shared strings + numbers), as spreadsheet programs write the CMMD sheet."""
    strings: list[str] = []
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'

    def cell(ref: str, v) -> str:
        if isinstance(v, (int, float)):
            return f'<c r="{ref}"><v>{float(v)}</v></c>'
        if v not in strings:
            strings.append(v)
        return f'<c r="{ref}" t="s"><v>{strings.index(v)}</v></c>'

    body = "".join(f'<row r="{i}">' + "".join(cell(f"{chr(65 + j)}{i}", v) for j, v in enumerate(r) if v != "") + "</row>"
                   for i, r in enumerate(rows, start=1))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("xl/worksheets/sheet1.xml", f"<worksheet {ns}><sheetData>{body}</sheetData></worksheet>")
        z.writestr("xl/sharedStrings.xml", f"<sst {ns}>" + "".join(f"<si><t>{s}</t></si>" for s in strings) + "</sst>")


def test_cmmd(tmp_path, capsys):
    root = tmp_path / "CMMD"
    s1 = root / "D1-0001" / "07-18-2010-NA-NA-79377" / "1.000000-NA-70244"
    s2 = root / "D2-0002" / "07-19-2011-NA-NA-12345" / "1.000000-NA-54321"
    dicom(s1 / "1-1.dcm", mammo("L"), "L", "CC")
    dicom(s1 / "1-2.dcm", mammo("L"), "L", "MLO")
    dicom(s2 / "1-1.dcm", mammo("R"), "R", "CC")
    dicom(s2 / "1-2.dcm", mammo("R"), "R", "MLO", ViewPosition=None)  # view from ViewCodeSequence
    dicom(s2 / "1-3.dcm", mammo("L"), "L", "CC")  # a breast without clinical row
    write_xlsx(tmp_path / "CMMD_clinicaldata_revision.xlsx", [
        ["ID1", "LeftRight", "Age", "number", "abnormality", "classification", "subtype"],
        ["D1-0001", "L", 44, 2, "calcification", "Benign", ""],
        ["D2-0002", "R", 51, 2, "mass", "Malignant", "Luminal A"],
        ["D1-0003", "R", 60, 2, "both", "Malignant", "HER2-enriched"],  # no images
    ])
    rc, rows = run_manifest("cmmd", tmp_path, tmp_path / "m.csv", key=lambda r: (Path(r["image_path"]).parts[1], Path(r["image_path"]).name))
    out = capsys.readouterr().out
    got = {k: (r["patient_id"], r["laterality"], r["view"], r["label"], r["subtype"], r["boxes"], r["source"]) for k, r in rows.items()}
    assert rc == 1 and got == {
        ("D1-0001", "1-1.dcm"): ("D1-0001", "L", "CC", "0", "", "", "CMMD"),
        ("D1-0001", "1-2.dcm"): ("D1-0001", "L", "MLO", "0", "", "", "CMMD"),
        ("D2-0002", "1-1.dcm"): ("D2-0002", "R", "CC", "1", "Luminal A", "", "CMMD"),
        ("D2-0002", "1-2.dcm"): ("D2-0002", "R", "MLO", "1", "Luminal A", "", "CMMD"),
    }
    assert "no_clinical_row_for_breast: 1" in out and "no_images_for_clinical_row: 1" in out
    assert "images 4   patients 2   label 0: 2   label 1: 2" in out


# ---------------------------------------------------------------------------------------------- errors
def test_missing_metadata_and_column(tmp_path, capsys):
    assert main(["manifest", "--from", "vindr-mammo", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    assert "breast-level_annotations.csv" in capsys.readouterr().err
    write_csv(tmp_path / "breast-level_annotations.csv", [h for h in BREAST_HEADER if h != "view_position"], [])
    write_csv(tmp_path / "finding_annotations.csv", FINDING_HEADER, [])
    assert main(["manifest", "--from", "vindr-mammo", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) ['view_position']" in err and "breast-level_annotations.csv" in err
    assert main(["manifest", "--from", "vindr-mammo", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv"),
                 "--set", "malignant_birads=7"]) == 2


# ---------------------------------------------------------------------------------------------- build
@pytest.mark.parametrize("name", ["cbis-ddsm", "vindr-mammo", "inbreast"])
def test_replica_builds_and_boxes_land_on_lesions(name, request, tmp_path):
    """manifest -> build-tfrecords at 64x48: every bright lesion pixel lies in a stored box, every box holds one."""
    import tensorflow as tf

    from mammodg.records import schema
    from mammodg.records.reader import all_shards, load_index

    root = request.getfixturevalue({"cbis-ddsm": "cbis", "vindr-mammo": "vindr", "inbreast": "inbreast"}[name])
    assert main(["manifest", "--from", name, "--root", str(root), "--out", str(tmp_path / "m.csv")]) == 1
    data = tmp_path / "data"
    assert main(["build-tfrecords", "--manifest", str(tmp_path / "m.csv"), "--out", str(data), "--quiet",
                 "--set", "preprocess.height=64", "--set", "preprocess.width=48", "--set", "workers=1",
                 "--set", "pseudonym_salt=test-salt-0123456789"]) == 0
    index = load_index(data)
    recs = [schema.parse(raw) for split in index["splits"] for raw in tf.data.TFRecordDataset(sorted(all_shards(index, data, split)))]
    with_boxes = [r for r in recs if len(r["boxes"])]
    assert len(recs) == 3 and len(with_boxes) == {"cbis-ddsm": 3, "vindr-mammo": 2, "inbreast": 2}[name]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(with_boxes), figsize=(2.2 * len(with_boxes), 3))
    for ax, r in zip(np.atleast_1d(axes), with_boxes):
        img = r["image"].numpy()[..., 0].astype(np.float64)
        boxes = r["boxes"].numpy()
        bright = img >= 0.85 * img.max()  # the lesions: the brightest pixels after resizing
        yy, xx = np.nonzero(bright)
        inside = np.zeros(len(yy), bool)
        for x0, y0, x1, y1 in boxes:
            inside |= (xx + 0.5 >= x0 - 0.5) & (xx + 0.5 <= x1 + 0.5) & (yy + 0.5 >= y0 - 0.5) & (yy + 0.5 <= y1 + 0.5)
            assert bright[int((y0 + y1) / 2), int((x0 + x1) / 2)], (name, (x0, y0, x1, y1))  # a lesion at its centre
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="red", lw=1))
        assert yy.size and inside.all(), name
        ax.imshow(img, cmap="gray")
        ax.set_title(f"{r['laterality'].numpy().decode()} {r['view'].numpy().decode()}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{name}: stored boxes after preprocessing", fontsize=8)
    fig.savefig(tmp_path / f"{name}_boxes.png", dpi=80)
    plt.close(fig)
    assert (tmp_path / f"{name}_boxes.png").stat().st_size > 1000
