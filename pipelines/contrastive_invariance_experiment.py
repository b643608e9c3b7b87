"""Does multi-style / multi-view pre-training make the backbone vendor-style invariant? (MSVCL v2, Fig. 7)

Trains the contrastive stage with several methods (default SimCLR and MSVCL) on the same data, pair
records and budget (the demo configuration unless ``--config`` is given), then measures on held-out
images the vendor-style accuracy of a linear probe on frozen embeddings (lower = more invariant) for
each backbone and for a randomly initialised one, with t-SNE figures. Writes ``results.md`` and
``results.json`` in ``--out``.

    python pipelines/contrastive_invariance_experiment.py [--steps 100] [--methods simclr msvcl]
        [--heldout-patients 15]   # probe new phantom patients, each rendered in every style
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def heldout_phantoms(out: Path, patients: int, contrastive_config: str) -> Path:
    """New phantom patients (a seed the demo does not use), every one rendered in each of the training
    data's phantom styles, made and built like the demo data (all in the train split)."""
    from mammodg.config import BuildConfig, TrainConfig, load
    from mammodg.demo import PHANTOM_SCALE
    from mammodg.phantom import make_phantoms
    from mammodg.records.reader import load_index
    from mammodg.records.writer import build

    records = out / "tfrecords"
    if not (records / "dataset.json").is_file():
        data_dir = load(TrainConfig, contrastive_config).data_dir
        styles = sum(s.startswith("PHANTOM|") for s in load_index(data_dir)["segments"])
        manifest = make_phantoms(out / "dicom", patients=patients, styles=styles, seed=101, scale=PHANTOM_SCALE,
                                 all_styles=True)
        build(manifest, records, load(BuildConfig, REPO / "configs" / "demo" / "build.yaml", ["val_fraction=0"]))
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo" / "contrastive.yaml"))
    ap.add_argument("--methods", nargs="+", default=["simclr", "msvcl"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--split", default="val", help="held-out images for the probe")
    ap.add_argument("--data", help="probe this image-records folder (e.g. phantoms of new patients, "
                    "mammodg make-phantoms --all-styles + build-tfrecords) instead of the runs' own data")
    ap.add_argument("--heldout-patients", type=int, default=0,
                    help="make this many new phantom patients (seed 101), each in every style, and probe all "
                         "their images (sets --data and --split train)")
    ap.add_argument("--out", default="runs/contrastive_invariance")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    args = ap.parse_args()

    from mammodg import stages
    from mammodg.config import TrainConfig, load
    from mammodg.demo import prepare_contrastive
    from mammodg.evaluate import evaluate_contrastive

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.heldout_patients:
        args.data, args.split = str(heldout_phantoms(out / "heldout", args.heldout_patients, args.config)), "train"
    rows = {}
    for method in args.methods:
        cfg = load(TrainConfig, args.config, args.set + [
            "stage=contrastive", f"run_dir={out / method}", f"contrastive.method={method}", f"steps={args.steps}",
            f"val_every={args.steps // 2 if args.steps % 2 == 0 else args.steps}"])
        t = time.perf_counter()
        prepare_contrastive(cfg)
        stages.run("contrastive", cfg)
        rows[method] = evaluate_contrastive(out / method, split=args.split, data_dir=args.data) | {"train_s": round(time.perf_counter() - t, 1)}
    first = json.loads(Path(rows[args.methods[0]]["json"]).read_text())
    random_acc = first["probe_random_init"]["accuracy"]
    random_bn_acc = first["probe_random_init_data_bn"]["accuracy"]
    chance = first["probe_trained"]["chance"]
    lines = [f"# Vendor-style linear probe on held-out embeddings ({args.data or 'own data'}, {args.split} split, "
             f"{first['probe_trained']['images']} images, {first['probe_trained']['folds']}-fold)", "",
             f"{args.steps} steps per method, config {args.config}. Lower accuracy = more style-invariant; "
             f"chance (majority style) = {chance:.3f}.", "",
             "| backbone | style accuracy |", "|---|---|"]
    lines += [f"| {m} | {r['style_accuracy']:.3f} |" for m, r in rows.items()]
    lines += [f"| random init | {random_acc:.3f} |",
              f"| random init, BatchNorm statistics from the training images | {random_bn_acc:.3f} |", ""]
    lines += [f"t-SNE figures: {', '.join(str(r['tsne']) for r in rows.values())}"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(
        {"steps": args.steps, "data": args.data, "split": args.split, "chance": chance, "random_init": random_acc,
         "random_init_data_bn": random_bn_acc,
         "methods": {m: {k: str(v) if isinstance(v, Path) else v for k, v in r.items()} for m, r in rows.items()}},
        indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
