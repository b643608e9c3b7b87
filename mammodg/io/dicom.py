"""Read a mammogram from DICOM: pixels with dense tissue bright, plus the metadata the pipeline needs.

Photometry, in this order (DICOM PS3.3 C.11 and C.8.11.3):

1. check the header (size bounds, native buffer length, rescale), decode (pydicom + pylibjpeg /
   pyjpegls / pillow plugins) and reject values outside ``BitsStored``;
2. Modality LUT (Rescale Slope / Intercept or Modality LUT Sequence);
3. VOI, by policy (``PreprocessConfig.voi``):

   - ``"auto"`` (default): a *VOI LUT Sequence* or a non-linear *VOI LUT Function* (SIGMOID) of a
     ``FOR PRESENTATION`` image is applied: it is the vendor's intended display curve. A plain LINEAR
     window is not applied: it only clips, and the in-breast renormalisation to [0, 1] re-stretches the
     range anyway. ``FOR PROCESSING`` (raw) images get no VOI.
   - ``"none"``: never apply VOI;  ``"always"``: apply the first VOI LUT or window whatever it is.

   What was applied is recorded in ``DicomImage.voi`` and in every TFRecord.
4. MONOCHROME1 is inverted *after* VOI, within the value range of the previous step.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

VOI_POLICIES = ("auto", "none", "always")
# Bounds on what a header may make us allocate (checked before decoding): a real mammogram is a few
# thousand pixels a side with an aspect ratio near 4:3; a 1 x 20000 image is an attack or a mistake.
MIN_SIDE = 32
MAX_ASPECT = 4.0
MAX_PIXELS = 50_000_000


class DicomRejected(ValueError):
    """The file cannot be used; ``reason`` is a short machine-readable code, ``str()`` the detail.

    Details never name the file (paths may hold PHI): the caller knows which row it was.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclasses.dataclass
class DicomImage:
    pixels: np.ndarray  # float32 (rows, cols), dense tissue bright
    value_range: tuple[float, float]  # theoretical range of ``pixels``
    laterality: str  # "L", "R" or ""
    view: str  # "CC", "MLO", "OTHER" or ""
    pixel_spacing_mm: float | None  # row spacing (square pixels assumed for resampling)
    manufacturer: str
    modality: str
    photometric: str
    transfer_syntax: str
    decoder: str
    voi: str
    bits_stored: int
    burned_in: bool  # BurnedInAnnotation is YES: text (possibly names) drawn into the pixels


def _text(ds, *keywords) -> str:
    parts = []
    for kw in keywords:
        v = ds.get(kw, None)
        if v is not None and str(v).strip():
            parts.append(str(v))
    return " ".join(parts)


_LAT_TOKENS = [(re.compile(r"(?<![A-Z])(LEFT|L)(?![A-Z])"), "L"), (re.compile(r"(?<![A-Z])(RIGHT|R)(?![A-Z])"), "R")]
_VIEW_TOKENS = [
    (re.compile(r"(?<![A-Z])(MLO|OBLIQUE|ML0|MEDIO-?LATERAL OBLIQUE)(?![A-Z])"), "MLO"),
    (re.compile(r"(?<![A-Z])(CC|CRANIO-?CAUDAL)(?![A-Z])"), "CC"),
]
# SNOMED / DICOM codes of ViewCodeSequence (CID 4014).
_VIEW_CODES = {"R-10242": "CC", "399162004": "CC", "R-10226": "MLO", "399368009": "MLO"}
# Where laterality and view are looked for when the dedicated tags are empty, in order. CBIS-DDSM
# stores "..._LEFT_CC" in PatientID, so it is the last resort (it is never written anywhere).
_DESCRIPTION_TAGS = ("SeriesDescription", "ImageComments", "StudyDescription", "ProtocolName",
                     "AcquisitionDeviceProcessingDescription", "PatientID")


def _search(tokens, text: str) -> str:
    text = re.sub(r"[_\-./]", " ", text.upper())
    for rx, value in tokens:
        if rx.search(text):
            return value
    return ""


def laterality_of(ds) -> str:
    """ImageLaterality, then Laterality, then a search of the description tags (PS3.3 C.8.11.7)."""
    for kw in ("ImageLaterality", "Laterality"):
        v = str(ds.get(kw, "") or "").strip().upper()
        if v in ("L", "R"):
            return v
    for kw in _DESCRIPTION_TAGS:
        v = _search(_LAT_TOKENS, _text(ds, kw))
        if v:
            return v
    return ""


def view_of(ds) -> str:
    """ViewPosition, then ViewCodeSequence, then a search of the description tags."""
    vp = str(ds.get("ViewPosition", "") or "").strip().upper()
    if vp in ("CC", "MLO"):
        return vp
    if vp in ("ML", "LM", "LMO", "XCCL", "XCCM", "FB", "SIO", "AT"):
        return "OTHER"
    for item in ds.get("ViewCodeSequence", []) or []:
        code = str(item.get("CodeValue", ""))
        if code in _VIEW_CODES:
            return _VIEW_CODES[code]
        v = _search(_VIEW_TOKENS, str(item.get("CodeMeaning", "")))
        if v:
            return v
    for kw in _DESCRIPTION_TAGS:
        v = _search(_VIEW_TOKENS, _text(ds, kw))
        if v:
            return v
    return ""


def pixel_spacing_of(ds) -> float | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        v = ds.get(kw, None)
        if v is not None:
            try:
                s = float(v[0])
            except (TypeError, ValueError, IndexError):
                continue
            if s > 0:
                return s
    return None


def _decoder_name(ds) -> str:
    tsyntax = ds.file_meta.get("TransferSyntaxUID", None)
    if tsyntax is None:
        return "native"
    if not tsyntax.is_compressed:
        return "native"
    from pydicom.pixels import get_decoder

    try:
        plugins = get_decoder(tsyntax).available_plugins
    except (NotImplementedError, ValueError):
        return "none"
    return plugins[0] if plugins else "none"


def check_bits_stored(ds, arr: np.ndarray, bits_stored: int, signed: bool) -> None:
    """Reject values outside the ``BitsStored`` range: high bits holding overlays or garbage (pydicom #2010)
    mean the decoder and the header disagree, and masking them would train on a guess.

    Native data is checked on the raw buffer (pydicom masks it when decoding); compressed data on the
    decoded array.
    """
    alloc = int(ds.get("BitsAllocated", 16) or 16)
    tsyntax = ds.file_meta.get("TransferSyntaxUID", None)
    if tsyntax is not None and not tsyntax.is_compressed and alloc in (8, 16, 32) and bits_stored < alloc:
        n = arr.size
        raw = np.frombuffer(ds.PixelData, dtype=f"{'<' if tsyntax.is_little_endian else '>'}u{alloc // 8}", count=n)
        high = raw >> np.array(bits_stored, raw.dtype)
        ones = (1 << (alloc - bits_stored)) - 1
        bad = (high != 0) & ((high != ones) if signed else True)
        if bad.any():
            raise DicomRejected("bits_stored_exceeded", f"{int(bad.sum())} pixel(s) use bits above the {bits_stored} of BitsStored: "
                                f"overlay bits, a broken header or a writer fault")
        return
    lo, hi = _stored_range(bits_stored, signed)
    if arr.size and (float(arr.min()) < lo or float(arr.max()) > hi):
        raise DicomRejected("bits_stored_exceeded", f"pixel values {arr.min()}..{arr.max()} lie outside the {bits_stored}-bit "
                            f"range of BitsStored: broken header, overlay bits or a decoder fault")


def check_file(path: Path) -> None:
    """Reject what is not a regular file, with a reason of its own (a folder, a link loop, a long name)."""
    try:
        st = os.stat(path)
    except OSError as e:
        reasons = {errno.ELOOP: ("symlink_loop", "symbolic link loop"), errno.ENAMETOOLONG: ("path_too_long", "path too long for the file system")}
        reason, detail = reasons.get(e.errno, ("missing_file", f"file not found ({errno.errorcode.get(e.errno, e.errno)})"))
        raise DicomRejected(reason, detail) from None
    if stat.S_ISDIR(st.st_mode):
        raise DicomRejected("is_directory", "image_path is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise DicomRejected("not_a_file", "image_path is not a regular file (a device, pipe or socket)")


def check_header(ds) -> None:
    """Bound what the header makes us allocate, and check the native pixel buffer size, before decoding."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, cols) < MIN_SIDE:
        raise DicomRejected("too_small", f"{cols}x{rows} pixels; at least {MIN_SIDE} a side")
    if max(rows, cols) / min(rows, cols) > MAX_ASPECT:
        raise DicomRejected("bad_aspect_ratio", f"{cols}x{rows} pixels; aspect ratio over {MAX_ASPECT:g}")
    if rows * cols > MAX_PIXELS:
        raise DicomRejected("too_large", f"{cols}x{rows} pixels; at most {MAX_PIXELS} pixels")
    tsyntax = ds.file_meta.get("TransferSyntaxUID", None)
    if "PixelData" in ds and tsyntax is not None and not tsyntax.is_compressed:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        expected = math.ceil(rows * cols * frames * samples * int(ds.get("BitsAllocated", 16) or 16) / 8)
        actual = len(ds.PixelData)
        if actual not in (expected, expected + 1):  # one byte of padding to an even length is allowed
            raise DicomRejected("pixel_size_mismatch", f"pixel data has {actual} bytes; Rows x Columns x BitsAllocated needs {expected}")


def _rescale(ds) -> tuple[float, float]:
    """Rescale slope and intercept; a slope <= 0 or any non-finite value is a broken header."""
    try:
        slope = float(ds.get("RescaleSlope", 1) if ds.get("RescaleSlope", None) not in (None, "") else 1)
        intercept = float(ds.get("RescaleIntercept", 0) if ds.get("RescaleIntercept", None) not in (None, "") else 0)
    except (TypeError, ValueError):
        raise DicomRejected("bad_rescale", "RescaleSlope / RescaleIntercept are not numbers") from None
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope <= 0:
        raise DicomRejected("bad_rescale", f"RescaleSlope {slope} / RescaleIntercept {intercept}: slope must be finite and > 0")
    return slope, intercept


def _stored_range(bits_stored: int, signed: bool) -> tuple[float, float]:
    if signed:
        return -(2.0 ** (bits_stored - 1)), 2.0 ** (bits_stored - 1) - 1
    return 0.0, 2.0 ** bits_stored - 1


def _apply_voi(arr, ds, policy: str, lo: float, hi: float):
    from pydicom.pixels import apply_voi_lut

    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    intent = str(ds.get("PresentationIntentType", "") or "").upper()
    if policy == "none" or not (has_lut or has_window):
        return arr, "none", (lo, hi)
    if policy == "auto":
        if intent == "FOR PROCESSING":
            return arr, "none (for processing)", (lo, hi)
        if not has_lut and function.startswith("LINEAR"):
            return arr, "none (linear window skipped)", (lo, hi)
    out = apply_voi_lut(arr, ds, index=0, prefer_lut=True).astype(np.float32)
    if has_lut:
        desc = ds.VOILUTSequence[0].LUTDescriptor
        return out, "voi-lut", (0.0, 2.0 ** int(desc[2]) - 1)
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return out, f"window ({function.lower()})", _stored_range(bits, signed)


def read_dicom(path: str | Path, *, voi: str = "auto", allow_non_mg: bool = False) -> DicomImage:
    """Read one single-frame greyscale mammogram; raise DicomRejected with a reason otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if voi not in VOI_POLICIES:
        raise ValueError(f"preprocess.voi must be one of {VOI_POLICIES}, got {voi!r}")
    path = Path(path)
    check_file(path)
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path)
        truncated = any("end of file" in str(w.message).lower() for w in caught)
    except InvalidDicomError as e:
        raise DicomRejected("not_dicom", f"not a DICOM file: {e}") from None
    except Exception as e:  # truncated headers and other broken files
        raise DicomRejected("unreadable", f"DICOM header unreadable: {type(e).__name__}: {e}") from None
    if truncated:
        raise DicomRejected("truncated", f"file ends before its data does ({path.stat().st_size} bytes): incomplete copy or transfer")
    if "PixelData" not in ds:
        raise DicomRejected("no_pixel_data", f"no image in this DICOM object (SOP class {ds.get('SOPClassUID', '?')})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomRejected("multi_frame", f"{frames} frames (tomosynthesis or a multi-frame object); only single-frame 2D mammograms are used")
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomRejected("colour", f"colour or non-greyscale image ({photometric or 'no PhotometricInterpretation'}, SamplesPerPixel={ds.get('SamplesPerPixel')})")
    modality = str(ds.get("Modality", "") or "")
    if modality != "MG" and not allow_non_mg:
        raise DicomRejected("not_mammography", f"Modality is {modality or 'empty'!r}, not 'MG' (use allow_non_mg to accept)")
    check_header(ds)
    tsyntax = ds.file_meta.get("TransferSyntaxUID", None)
    ts_name = tsyntax.name if tsyntax is not None else "unknown"
    decoder = _decoder_name(ds)
    if decoder == "none":
        raise DicomRejected("no_decoder", f"no decoder installed for transfer syntax {ts_name}")
    try:
        arr = ds.pixel_array
    except Exception as e:
        raise DicomRejected("decode_failed", f"pixel data could not be decoded ({ts_name}, decoder {decoder}): {type(e).__name__}: {e}") from None
    if arr.ndim != 2:
        raise DicomRejected("colour", f"decoded pixel array has shape {arr.shape}, expected 2-D greyscale")
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    check_bits_stored(ds, arr, bits, signed)
    if arr.size == 0 or arr.min() == arr.max():
        raise DicomRejected("constant_image", f"decoded image is constant ({ts_name}, decoder {decoder}): broken data or decoder")
    from pydicom.pixels import apply_modality_lut

    lo, hi = _stored_range(bits, signed)
    slope, intercept = _rescale(ds)
    if "ModalityLUTSequence" in ds:
        arr = apply_modality_lut(arr, ds).astype(np.float32)
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        arr = arr.astype(np.float32) * slope + intercept
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    arr, voi_applied, (lo, hi) = _apply_voi(arr, ds, voi, lo, hi)
    if photometric == "MONOCHROME1":
        arr = (lo + hi) - arr
    return DicomImage(
        pixels=np.asarray(arr, dtype=np.float32),
        value_range=(float(lo), float(hi)),
        laterality=laterality_of(ds),
        view=view_of(ds),
        pixel_spacing_mm=pixel_spacing_of(ds),
        manufacturer=str(ds.get("Manufacturer", "") or "").strip(),
        modality=modality,
        photometric=photometric,
        transfer_syntax=ts_name,
        decoder=decoder,
        voi=voi_applied,
        bits_stored=bits,
        burned_in=str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES",
    )
