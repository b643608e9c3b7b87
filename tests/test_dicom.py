"""DICOM reading: transfer syntaxes, photometry, metadata fallbacks and rejections."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mammodg.io.dicom import DicomRejected, laterality_of, read_dicom, view_of


def _read(name, **kw):
    return read_dicom(get_testdata_file(name), allow_non_mg=True, **kw)


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_syntaxes_equal_uncompressed(name):
    ref = _read("MR_small.dcm")
    img = _read(name)
    np.testing.assert_array_equal(img.pixels, ref.pixels)
    assert img.transfer_syntax != ref.transfer_syntax


def test_jpeg2000_lossless_and_lossy_against_uncompressed():
    np.testing.assert_array_equal(_read("MR2_J2KR.dcm").pixels, _read("MR2_UNCR.dcm").pixels)
    ref = _read("MR2_UNCI.dcm").pixels
    lossy = _read("MR2_J2KI.dcm")
    assert lossy.transfer_syntax == "JPEG 2000 Image Compression"
    np.testing.assert_array_equal(lossy.pixels, ref)  # the testdata's reference is the decoded lossy image


def test_jpeg_lossless_process14_decodes():
    img = _read("JPEG-LL.dcm")
    assert img.pixels.shape == (1024, 256) and img.decoder == "pylibjpeg"
    assert img.pixels.std() > 0


def test_monochrome1_inverted_dense_bright():
    """A MONOCHROME1 CR image: after reading, (inverted) values equal the range minus the stored ones."""
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCI.dcm"))
    img = _read("RG3_UNCI.dcm", voi="none")
    bits = int(ds.BitsStored)
    np.testing.assert_array_equal(img.pixels, (2 ** bits - 1) - ds.pixel_array.astype(np.float32))
    np.testing.assert_array_equal(_read("RG3_J2KI.dcm", voi="none").pixels.shape, img.pixels.shape)


def _mg(arr, **tags) -> Dataset:
    """An in-memory MG dataset around ``arr`` (uint16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MG"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = arr.astype("<u2").tobytes()
    return ds


def _save(tmp_path, ds, name="x.dcm"):
    p = tmp_path / name
    ds.save_as(p, enforce_file_format=True)
    return p


def test_values_beyond_bits_stored_rejected(tmp_path):
    rng = np.random.default_rng(0)
    low = rng.integers(0, 4096, (40, 32), dtype=np.uint16)
    np.testing.assert_array_equal(read_dicom(_save(tmp_path, _mg(low), "ok.dcm")).pixels, low.astype(np.float32))
    garbage = low.copy()
    garbage[5, 7] |= 1 << 12  # one value over the 12 bits of BitsStored
    with pytest.raises(DicomRejected) as e:
        read_dicom(_save(tmp_path, _mg(garbage)))
    assert e.value.reason == "bits_stored_exceeded"


def test_voi_policy(tmp_path):
    arr = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (64, 1))
    linear = _save(tmp_path, _mg(arr, WindowCenter=2048, WindowWidth=1024), "lin.dcm")
    assert read_dicom(linear).voi.startswith("none")  # auto skips a linear window
    np.testing.assert_array_equal(read_dicom(linear).pixels, arr.astype(np.float32))
    assert read_dicom(linear, voi="always").pixels.max() == 4095  # the window clips
    sig = _save(tmp_path, _mg(arr, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID"), "sig.dcm")
    out = read_dicom(sig)
    assert out.voi == "window (sigmoid)"
    x = arr.astype(np.float64)
    expected = 4095 / (1 + np.exp(-4 * (x - 2048) / 1024))  # PS3.3 C.11.2.1.3.1
    np.testing.assert_allclose(out.pixels, expected, rtol=1e-4, atol=1e-2)
    raw = _save(tmp_path, _mg(arr, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID", PresentationIntentType="FOR PROCESSING"), "raw.dcm")
    assert read_dicom(raw).voi == "none (for processing)"
    # MONOCHROME1 is inverted after the VOI curve
    m1 = _save(tmp_path, _mg(arr, WindowCenter=2048, WindowWidth=1024, VOILUTFunction="SIGMOID", PhotometricInterpretation="MONOCHROME1"), "m1.dcm")
    np.testing.assert_allclose(read_dicom(m1).pixels, 4095 - expected, rtol=1e-4, atol=1e-2)


def test_laterality_and_view_fallbacks():
    ds = Dataset()
    ds.PatientID = "Mass-Test_P_00173_RIGHT_CC"
    assert (laterality_of(ds), view_of(ds)) == ("R", "CC")
    ds.SeriesDescription = "L MLO"
    assert (laterality_of(ds), view_of(ds)) == ("L", "MLO")
    ds.Laterality = "R"
    item = Dataset()
    item.CodeValue, item.CodeMeaning = "R-10242", "cranio-caudal"
    ds.ViewCodeSequence = Sequence([item])
    assert (laterality_of(ds), view_of(ds)) == ("R", "CC")
    ds.ImageLaterality, ds.ViewPosition = "L", "MLO"
    assert (laterality_of(ds), view_of(ds)) == ("L", "MLO")
    ds.ViewPosition = "ML"
    assert view_of(ds) == "OTHER"


def test_real_mammograms_metadata(real_cases):
    for folder, key, path in real_cases:
        img = read_dicom(path)
        assert img.laterality == key[0].upper()
        assert img.view == key[1:].upper()
        assert img.transfer_syntax == "RLE Lossless"
        assert img.pixels.shape[0] > 4000


@pytest.mark.parametrize("name,reason", [
    ("SC_rgb.dcm", "colour"),
    ("OBXXXX1A_2frame.dcm", "multi_frame"),
    ("rtplan.dcm", "no_pixel_data"),
])
def test_rejections_testdata(name, reason):
    with pytest.raises(DicomRejected) as e:
        _read(name)
    assert e.value.reason == reason


def test_rejections_files(tmp_path):
    with pytest.raises(DicomRejected) as e:
        read_dicom(tmp_path / "nope.dcm")
    assert e.value.reason == "missing_file"
    (tmp_path / "a.dcm").write_bytes(b"hello, not a dicom" * 20)
    with pytest.raises(DicomRejected) as e:
        read_dicom(tmp_path / "a.dcm")
    assert e.value.reason == "not_dicom"
    with pytest.raises(DicomRejected) as e:
        read_dicom(get_testdata_file("MR_small.dcm"))
    assert e.value.reason == "not_mammography"
    const = _save(tmp_path, _mg(np.zeros((40, 40), np.uint16)), "c.dcm")
    with pytest.raises(DicomRejected) as e:
        read_dicom(const)
    assert e.value.reason == "constant_image"


def test_truncated_jpeg2000(tmp_path):
    from mammodg.phantom import default_styles, render, sample_patient, write_dicom

    style = next(s for s in default_styles(3) if "2000" in s.transfer_syntax.name)
    breast = sample_patient(np.random.default_rng(0), 0)[0]
    pixels, _ = render(breast, "CC", style, scale=0.2)
    good = tmp_path / "good.dcm"
    write_dicom(good, pixels, style=style, breast=breast, view="CC", patient_id="PH1", scale=0.2)
    assert read_dicom(good).pixels.shape == pixels.shape
    data = good.read_bytes()
    for frac in (0.5, 0.9, 0.99):
        bad = tmp_path / f"cut{frac}.dcm"
        bad.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(DicomRejected) as e:
            read_dicom(bad)
        assert e.value.reason in ("truncated", "decode_failed"), e.value.reason
