"""Vendor styles: how one acquisition system turns the breast's signal into stored pixel values.

A :class:`Style` fixes the detector (field, pixel spacing, bit depth), the intensity curve
(gamma, contrast, brightness), unsharp masking, correlated noise, the photometric interpretation
and the DICOM transfer syntax. :func:`apply_style` applies it to a MONOCHROME2 signal.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from scipy import ndimage

# Physical detector field (height, width) in mm.
FIELD_MM = (240.0, 192.0)
LOSSLESS_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless)


@dataclass
class Style:
    """One acquisition "vendor" style. ``name`` is written as DICOM Manufacturer."""

    name: str
    pixel_spacing_mm: float = 0.2
    gamma: float = 1.0  # applied to the [0, 1] MONOCHROME2 signal: s ** gamma
    contrast: float = 1.0  # slope around ``pivot``
    noise_sigma: float = 0.01  # noise std (fraction of full range), times 0.6-1.3 as the signal rises
    noise_corr_px: float = 1.0  # Gaussian sigma (detector pixels) of the noise correlation
    sharpen: float = 0.0  # unsharp-mask amount
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    transfer_syntax: str = ExplicitVRLittleEndian
    model_name: str = ""
    brightness: float = 0.0  # additive offset applied with the contrast
    pivot: float = 0.45  # contrast pivot (signal level kept fixed by ``contrast``)
    sharpen_sigma_px: float = 2.5  # unsharp-mask Gaussian sigma (detector pixels)
    field_mm: tuple[float, float] = FIELD_MM  # (height, width) of the detector field
    j2k_cr: float = 10.0  # compression ratio of the lossy JPEG 2000 syntax
    window: bool = True  # write WindowCenter / WindowWidth spanning the full range

    @property
    def max_value(self) -> int:
        return (1 << int(self.bits_stored)) - 1

    def matrix(self, scale: float = 1.0) -> tuple[int, int]:
        """(rows, columns) of this style's images at ``scale``."""
        sp = self.pixel_spacing_mm / scale
        return (max(8, int(round(self.field_mm[0] / sp))), max(8, int(round(self.field_mm[1] / sp))))


_BASE_STYLES = [
    dict(pixel_spacing_mm=0.200, gamma=1.00, contrast=1.00, noise_sigma=0.010, noise_corr_px=0.8,
         sharpen=0.30, photometric="MONOCHROME2", bits_stored=12,
         transfer_syntax=ExplicitVRLittleEndian, model_name="Phantom Mammo 2000"),
    dict(pixel_spacing_mm=0.175, gamma=0.80, contrast=1.20, noise_sigma=0.014, noise_corr_px=1.6,
         sharpen=0.90, photometric="MONOCHROME1", bits_stored=14, transfer_syntax=RLELossless,
         model_name="Senograph Phantom", brightness=-0.02),
    dict(pixel_spacing_mm=0.215, gamma=1.30, contrast=0.85, noise_sigma=0.020, noise_corr_px=0.5,
         sharpen=0.00, photometric="MONOCHROME2", bits_stored=12, transfer_syntax=JPEG2000Lossless,
         model_name="Mammomat Phantom", brightness=0.03),
    dict(pixel_spacing_mm=0.185, gamma=1.10, contrast=1.10, noise_sigma=0.008, noise_corr_px=2.5,
         sharpen=1.40, photometric="MONOCHROME2", bits_stored=16, transfer_syntax=JPEGLSLossless,
         model_name="Amulet Phantom", sharpen_sigma_px=4.0),
    dict(pixel_spacing_mm=0.210, gamma=0.90, contrast=0.95, noise_sigma=0.012, noise_corr_px=1.0,
         sharpen=0.50, photometric="MONOCHROME1", bits_stored=10, transfer_syntax=JPEG2000,
         model_name="Selenia Phantom", j2k_cr=8.0),
]
_SYNTAX_CYCLE = [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless, JPEG2000]


def _style_name(i: int) -> str:
    return f"Vendor{chr(ord('A') + i)}" if i < 26 else f"Vendor{i + 1}"


def default_styles(k: int) -> list[Style]:
    """``k`` distinct vendor styles (deterministic).

    The first five are hand-made: transfer syntaxes Explicit VR Little Endian, RLE Lossless,
    JPEG 2000 Lossless, JPEG-LS Lossless, JPEG 2000 (lossy); VendorB and VendorE are MONOCHROME1;
    pixel spacing 0.175-0.215 mm (1116-1371 rows at scale 1); bits stored 10/12/14/16. Further
    styles are drawn at random from a fixed seed (one per style index), the syntaxes cycling on.
    """
    if int(k) < 1:
        raise ValueError("k must be >= 1")
    styles = []
    for i in range(int(k)):
        if i < len(_BASE_STYLES):
            params = dict(_BASE_STYLES[i])
        else:
            r = np.random.default_rng([20240607, i])
            params = dict(
                pixel_spacing_mm=float(np.round(r.uniform(0.175, 0.22), 3)),
                gamma=float(np.round(r.uniform(0.75, 1.35), 3)),
                contrast=float(np.round(r.uniform(0.8, 1.25), 3)),
                noise_sigma=float(np.round(r.uniform(0.006, 0.022), 4)),
                noise_corr_px=float(np.round(r.uniform(0.5, 2.5), 2)),
                sharpen=float(np.round(r.uniform(0.0, 1.4), 2)),
                photometric="MONOCHROME1" if r.random() < 0.35 else "MONOCHROME2",
                bits_stored=int(r.choice([10, 12, 14, 16])),
                transfer_syntax=_SYNTAX_CYCLE[i % len(_SYNTAX_CYCLE)],
                model_name=f"Phantom Model {i + 1}",
                brightness=float(np.round(r.uniform(-0.03, 0.03), 3)),
            )
        styles.append(Style(name=_style_name(i), **params))
    return styles


def style_key(style: Style) -> int:
    """A stable integer of all the style's fields (seeds the style's noise)."""
    return zlib.crc32(repr(dataclasses.astuple(style)).encode())


def _noise_field(rng, shape, corr_px: float):
    """Gaussian-correlated noise of unit standard deviation."""
    n = rng.standard_normal(shape, dtype=np.float32)
    if corr_px <= 0.05:
        return n
    n = ndimage.gaussian_filter(n, corr_px, mode="reflect", truncate=3.0)
    # the filtered variance is (sum of the squared 1-D kernel weights) ** 2 (separable 2-D kernel),
    # so dividing by that sum gives unit std
    rad = int(3.0 * corr_px + 0.5)
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / corr_px) ** 2)
    k /= k.sum()
    return n / np.float32(np.sum(k ** 2))


def apply_style(signal: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """MONOCHROME2 signal in [0, 1] (float32, dense = bright) -> uint16 stored values of ``style``.

    Gamma, contrast and brightness, unsharp masking, signal-dependent correlated noise drawn from
    ``rng``, quantisation to ``bits_stored`` and, for MONOCHROME1, inversion of the stored values.
    ``signal`` is modified in place.
    """
    S = signal
    if style.gamma != 1.0:
        S = S ** np.float32(style.gamma)
    if style.contrast != 1.0 or style.brightness != 0.0:
        S = np.float32(style.pivot) + np.float32(style.contrast) * (S - np.float32(style.pivot))
        S += np.float32(style.brightness)
    if style.sharpen > 0:
        blur = ndimage.gaussian_filter(S, style.sharpen_sigma_px, truncate=3.0)
        S += np.float32(style.sharpen) * (S - blur)
    if style.noise_sigma > 0:
        noise = _noise_field(rng, S.shape, style.noise_corr_px)
        # a little signal-dependent (quantum-like) component
        S += np.float32(style.noise_sigma) * noise * (np.float32(0.6) + np.float32(0.7) * np.sqrt(np.clip(S, 0, 1)))
    maxv = style.max_value
    q = np.clip(S, 0, 1) * np.float32(maxv) + np.float32(0.5)
    px = q.astype(np.uint16)
    if style.photometric == "MONOCHROME1":
        px = np.uint16(maxv) - px
    return px
