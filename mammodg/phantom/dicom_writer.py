"""DICOM writer: one rendered image as an MG "For Presentation" file, as a vendor would store it.

Every identifying field is synthetic (``PHANTOM^<patient id>``, a fixed birth date, a study date
derived from the patient index), so a phantom set contains no PHI while the reader and the
pseudonymisation of the records builder still see the fields of a real mammogram.
"""
from __future__ import annotations

import datetime as _dt
import pathlib

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as _DcmSequence
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, generate_uid

from mammodg.phantom.anatomy import Breast
from mammodg.phantom.styles import Style

MG_FOR_PRESENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"

_VIEW_CODES = {
    "CC": ("R-10242", "cranio-caudal"),
    "MLO": ("R-10226", "medio-lateral oblique"),
}
_PATIENT_ORIENTATION = {
    ("L", "CC"): ["A", "R"], ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "F"], ("R", "MLO"): ["P", "F"],
}


def _study_date(patient_index: int) -> str:
    """A study date in the 1400 days from 2019-01-02, a function of the patient index only."""
    d = _dt.date(2019, 1, 2) + _dt.timedelta(days=(int(patient_index) * 37) % 1400)
    return d.strftime("%Y%m%d")


def write_dicom(
    path,
    pixels: np.ndarray,
    *,
    style: Style,
    breast: Breast,
    view: str,
    patient_id: str,
    scale: float = 1.0,
    seed: int = 0,
    source: str = "PHANTOM",
) -> None:
    """Write ``pixels`` (stored values from :func:`~mammodg.phantom.render.render`) as an MG
    For-Presentation DICOM file at ``path`` (parent folders are created).

    The SOP Instance UID is deterministic in (seed, style, patient, laterality, view), the study and
    series UIDs in (seed, style, patient). The transfer syntax is ``style.transfer_syntax``
    (compressed syntaxes via ``Dataset.compress``; lossy JPEG 2000 is marked as lossy).
    """
    view = view.upper()
    lat = breast.laterality
    pixels = np.ascontiguousarray(pixels, dtype=np.uint16)
    rows, cols = pixels.shape
    spacing = float(style.pixel_spacing_mm) / float(scale)
    ent = ["mammodg-phantom", str(seed), style.name, patient_id]
    sop_uid = generate_uid(entropy_srcs=ent + [lat, view, "sop"])
    study_uid = generate_uid(entropy_srcs=ent + ["study"])
    series_uid = generate_uid(entropy_srcs=ent + ["series"])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MG_FOR_PRESENTATION_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = MG_FOR_PRESENTATION_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    date = _study_date(breast.patient_index)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"ACC{patient_id}"
    ds.Modality = "MG"
    ds.Manufacturer = style.name
    ds.ManufacturerModelName = style.model_name or f"{style.name} Phantom"
    ds.InstitutionName = source
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "PHANTOM MAMMOGRAPHY"
    ds.SeriesDescription = f"{lat} {view}"
    ds.PatientName = f"PHANTOM^{patient_id}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = {"LCC": 1, "LMLO": 2, "RCC": 3, "RMLO": 4}.get(lat + view, 1)
    ds.PatientOrientation = _PATIENT_ORIENTATION[(lat, view)]
    ds.Laterality = lat
    ds.ImageLaterality = lat
    ds.ViewPosition = view
    code = Dataset()
    code.CodeValue, code.CodeMeaning = _VIEW_CODES[view]
    code.CodingSchemeDesignator = "SRT"
    code.ViewModifierCodeSequence = _DcmSequence([])
    ds.ViewCodeSequence = _DcmSequence([code])
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.ImagerPixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.DetectorType = "DIRECT"
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = style.photometric
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated = 16
    ds.BitsStored = int(style.bits_stored)
    ds.HighBit = int(style.bits_stored) - 1
    ds.PixelRepresentation = 0
    ds.PresentationLUTShape = "INVERSE" if style.photometric == "MONOCHROME1" else "IDENTITY"
    maxv = style.max_value
    if style.window:
        ds.WindowCenter = f"{(maxv + 1) / 2:.1f}"
        ds.WindowWidth = str(maxv + 1)
        ds.VOILUTFunction = "LINEAR"
    ts = pydicom.uid.UID(style.transfer_syntax)
    if ts == ExplicitVRLittleEndian:
        ds.PixelData = pixels.astype("<u2", copy=False).tobytes()
        ds["PixelData"].VR = "OW"
    else:
        kwargs = {}
        if ts == JPEG2000:
            kwargs["j2k_cr"] = [float(style.j2k_cr)]
        ds.compress(ts, pixels, generate_instance_uid=False, **kwargs)
        if ts == JPEG2000:
            ds.LossyImageCompression = "01"
            ds.LossyImageCompressionRatio = [f"{float(style.j2k_cr):.2f}"]
            ds.LossyImageCompressionMethod = ["ISO_15444_1"]
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)

