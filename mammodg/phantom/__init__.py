"""Synthetic, realistic-looking mammograms written as real DICOM files (Modality MG).

Used by the tests, the demo and the experiments: several "vendor" styles render the same physical
anatomy with different pixel spacing, intensity curve, contrast, noise, sharpening, bit depth,
photometric interpretation (MONOCHROME1/2) and transfer syntax.

Read in this order: :mod:`~mammodg.phantom.anatomy` (a breast in millimetres, its outline, muscle
and true landmarks), :mod:`~mammodg.phantom.lesions` (masses and calcifications, their boxes),
:mod:`~mammodg.phantom.styles` (vendor styles), :mod:`~mammodg.phantom.render` (attenuation map ->
stored pixels), :mod:`~mammodg.phantom.dicom_writer` (the DICOM file) and
:mod:`~mammodg.phantom.manifest` (:func:`make_phantoms`: the data set, its manifest and landmarks).
"""
from __future__ import annotations

from mammodg.io.manifest import LESION_CLASSES
from mammodg.phantom.anatomy import Breast, landmarks, sample_patient
from mammodg.phantom.dicom_writer import MG_FOR_PRESENTATION_SOP_CLASS, write_dicom
from mammodg.phantom.lesions import Lesion
from mammodg.phantom.manifest import BIRADS_ORDER, MANIFEST_COLUMNS, make_phantoms
from mammodg.phantom.render import render
from mammodg.phantom.styles import LOSSLESS_SYNTAXES, Style, default_styles

__all__ = [
    "Style",
    "Lesion",
    "Breast",
    "default_styles",
    "sample_patient",
    "landmarks",
    "render",
    "write_dicom",
    "make_phantoms",
    "MANIFEST_COLUMNS",
    "MG_FOR_PRESENTATION_SOP_CLASS",
    "LESION_CLASSES",
    "BIRADS_ORDER",
    "LOSSLESS_SYNTAXES",
]
