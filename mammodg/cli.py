"""The ``mammodg`` command.

Exit status of ``build-tfrecords``: 0 every row was built; 1 shards were built but some rows were
rejected (listed in ``<out>/rejects.csv``); 2 nothing was built (bad manifest, config or arguments).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mammodg.demo import DEMO_DATA

DEMO_DIR = DEMO_DATA.parent


def _add_config_args(p):
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set preprocess.height=256 (repeatable)")


def cmd_build(args) -> int:
    from mammodg.config import BuildConfig, load
    from mammodg.records.writer import EXIT_OK, EXIT_REJECTED, REJECTS_NAME, build, format_summary

    cfg = load(BuildConfig, args.config, args.set)
    if args.workers is not None:
        cfg.workers = args.workers
    index = build(args.manifest, args.out, cfg, progress=not args.quiet)
    print(format_summary(index))
    if index["rejected"]:
        print(f"{index['rejected']} row(s) rejected, reasons in {Path(args.out) / REJECTS_NAME}", file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK


def cmd_phantoms(args) -> int:
    from mammodg.io.phantom import make_phantoms

    path = make_phantoms(args.out, patients=args.patients, styles=args.styles, seed=args.seed,
                         scale=args.scale, all_styles=args.all_styles, progress=not args.quiet)
    print(f"manifest written: {path}")
    return 0


def cmd_pairs(args) -> int:
    from mammodg.records.pairs import build_pairs, format_pairs_summary

    transfer = None
    if args.cyclegan:
        from mammodg.records.styles import StyleTransfer

        transfer = StyleTransfer.load(args.cyclegan)
    index = build_pairs(args.data, args.out, transfer=transfer, size=tuple(args.size) if args.size else None,
                        progress=not args.quiet)
    print(format_pairs_summary(index))
    return 0


def cmd_demo(args) -> int:
    """The embedded default: real + synthetic mammograms -> TFRecords -> dataset summary."""
    from mammodg.demo import build_demo_dataset
    from mammodg.records.writer import format_summary

    index, out = build_demo_dataset(Path(args.out), progress=not args.quiet)
    print(format_summary(index))
    print(f"shards and dataset.json in {out}")
    return 0


from mammodg.stages import STAGE_MODULES

STAGES = tuple(STAGE_MODULES)


def _default_config(stage: str) -> Path | None:
    path = Path(__file__).resolve().parent.parent / "configs" / "demo" / f"{stage}.yaml"
    return path if path.is_file() else None


def cmd_train(args) -> int:
    from mammodg import stages
    from mammodg.config import TrainConfig, load

    cfg = load(TrainConfig, args.config or _default_config(args.stage), args.set + [f"stage={args.stage}"])
    if args.stage == "contrastive" and (args.config is None or cfg.contrastive.cyclegan_config):
        from mammodg.demo import prepare_contrastive

        prepare_contrastive(cfg)  # the embedded default makes its missing inputs first
    stages.run(args.stage, cfg)
    return 0


def cmd_evaluate(args) -> int:
    from mammodg.config import TrainConfig, load
    from mammodg.evaluate import evaluate_contrastive, evaluate_run

    run = Path(args.run)
    stage = args.stage or (load(TrainConfig, run / "config.yaml").stage if (run / "config.yaml").is_file() else "classifier")
    if stage == "contrastive":
        paths = evaluate_contrastive(run, split=args.split, data_dir=args.data)
    else:
        paths = evaluate_run(run, split=args.split, n_boot=args.n_boot)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mammodg", description="Mammography training across hospitals and vendors.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tfrecords", help="DICOM + manifest -> per-segment TFRecord shards and dataset.json")
    p.add_argument("--manifest", required=True, help="manifest CSV (schema in README.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, help="processes (default: config 'workers', 0 = all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("make-phantoms", help="write synthetic mammograms (DICOM) in several vendor styles + manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--patients", type=int, default=20)
    p.add_argument("--styles", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="matrix size multiplier (smaller = faster)")
    p.add_argument("--all-styles", action="store_true", help="render every patient in every style")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("build-pairs", help="image shards -> breast-level pair records (CC+MLO, every seen style)")
    p.add_argument("--data", required=True, help="image records folder (mammodg build-tfrecords)")
    p.add_argument("--out", required=True)
    p.add_argument("--cyclegan", help="run folder of a cyclegan stage: add its style transfers")
    p.add_argument("--size", type=int, nargs=2, metavar=("ROWS", "COLS"), help="resize the images (default: as built)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pairs)

    p = sub.add_parser("demo", help="run the embedded demo on bundled real and synthetic mammograms")
    p.add_argument("--out", default=str(DEMO_DIR))
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a stage (configs/demo/<stage>.yaml by default)")
    p.add_argument("--stage", required=True, choices=STAGES)
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="classifier: metrics, bootstrap CIs, ROC, validation curves; contrastive: style invariance")
    p.add_argument("--run", required=True, help="run folder of a classifier or contrastive run")
    p.add_argument("--stage", choices=("classifier", "contrastive"), help="default: the run's own stage")
    p.add_argument("--data", help="contrastive: probe held-out images of this image-records folder instead")
    p.add_argument("--split", default="val")
    p.add_argument("--n-boot", type=int, default=2000)
    p.set_defaults(func=cmd_evaluate)

    args = parser.parse_args(argv)
    from mammodg.config import ConfigError
    from mammodg.io.manifest import ManifestError

    try:
        return args.func(args)
    except (ConfigError, ManifestError, ValueError, FileNotFoundError) as e:
        print(f"mammodg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
