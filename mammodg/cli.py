"""The ``mammodg`` command.

Exit status of ``build-tfrecords``: 0 every row was built; 1 shards were built but some rows were
rejected (listed in ``<out>/rejects.csv``); 2 nothing was built (bad manifest, config or arguments, a
second build into the same folder, or every row rejected). ``verify``: 0 all shards match, 2 otherwise.
"""
from __future__ import annotations

import argparse
import os
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
    from mammodg.records.writer import EXIT_ERROR, EXIT_OK, EXIT_REJECTED, REJECTS_NAME, BuildError, build, format_summary

    cfg = load(BuildConfig, args.config, args.set)
    if args.workers is not None:
        cfg.workers = args.workers
    if args.beam_option and args.runner != "beam":
        raise BuildError("--beam-option needs --runner beam")
    run_tasks = None  # the local process pool
    if args.runner == "beam":
        from mammodg.records.beam import beam_runner

        run_tasks = beam_runner(args.beam_option)
    try:
        index = build(args.manifest, args.out, cfg, progress=not args.quiet, root=args.root, run_tasks=run_tasks)
    except OSError as e:  # e.g. --out on a read-only disk or a name too long for a path
        raise BuildError(f"{e.filename or args.out}: {e.strerror or e}") from None
    print(format_summary(index))
    if not index["records"]:
        print(f"mammodg build-tfrecords: error: nothing was built: all {index['rejected']} row(s) rejected, "
              f"reasons in {Path(args.out) / REJECTS_NAME}", file=sys.stderr)
        return EXIT_ERROR
    if index["rejected"]:
        print(f"{index['rejected']} row(s) rejected, reasons in {Path(args.out) / REJECTS_NAME}", file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_OK


def cmd_manifest(args) -> int:
    """A public dataset's official metadata -> manifest CSV; exit 1 when some rows were skipped."""
    from mammodg.config import load
    from mammodg.io.datasets import DatasetConfig, convert

    summary = convert(args.dataset, args.root, args.out, load(DatasetConfig, args.config, args.set))
    print(summary.format())
    print(f"manifest written: {args.out}")
    return 1 if summary.skipped else 0


def cmd_verify(args) -> int:
    from mammodg.records.verify import verify

    res = verify(args.data, quick=args.quick)
    print(f"{args.data}: {res['shards']} shard(s), {res['records']} record(s) match dataset.json"
          + (" (sizes and counts)" if args.quick else " (sizes, counts and SHA-256)"))
    return 0


def cmd_phantoms(args) -> int:
    from mammodg.phantom import make_phantoms

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
    elif stage in ("birads", "density"):
        from mammodg.evaluate import evaluate_downstream

        paths = evaluate_downstream(run, split=args.split, data_dir=args.data, n_boot=args.n_boot)
    elif stage == "detection":
        from mammodg.evaluate import evaluate_detection

        paths = evaluate_detection(run, split=args.split, data_dir=args.data)
    elif stage == "matching":
        from mammodg.evaluate import evaluate_matching

        paths = evaluate_matching(run, split=args.split)
    else:
        paths = evaluate_run(run, split=args.split, n_boot=args.n_boot)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def quiet_tensorflow() -> None:
    """Import TensorFlow without its start-up chatter (oneDNN and CPU-feature lines, absl's preamble: written
    to the stderr file descriptor during the import) and keep its later C++ and Python logs to errors.
    ``mammodg -v`` skips this and shows everything."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    tf.get_logger().setLevel("ERROR")
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)


def cmd_export(args) -> int:
    from mammodg.export import export_run

    export_run(args.run, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mammodg", description="Mammography training across hospitals and vendors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show TensorFlow's start-up and log messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build-tfrecords", help="DICOM + manifest -> per-segment TFRecord shards and dataset.json")
    p.add_argument("--manifest", required=True, help="manifest CSV (schema in README.md)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=int, help="processes (default: config 'workers', 0 = all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--root", help="confine image paths to this folder ('..', absolute paths and links leaving it are rejected)")
    p.add_argument("--runner", choices=("local", "beam"), default="local",
                   help="local: a process pool on this machine; beam: Apache Beam (pip install 'mammodg[beam]'), "
                        "embedded FnApiRunner with --workers processes unless --beam-option runner=... says otherwise")
    p.add_argument("--beam-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a Beam pipeline option, e.g. runner=FlinkRunner or flink_master=host:8081 (repeatable)")
    _add_config_args(p)
    p.set_defaults(func=cmd_build)

    from mammodg.io.datasets import DATASETS

    p = sub.add_parser("manifest", help="public dataset (official metadata as distributed) -> manifest CSV")
    p.add_argument("--from", dest="dataset", required=True, choices=list(DATASETS), help="dataset name")
    p.add_argument("--root", required=True, help="the dataset's folder as downloaded")
    p.add_argument("--out", required=True, help="manifest CSV to write (image paths relative to its folder)")
    _add_config_args(p)
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("verify", help="check shards against dataset.json (size, record count, SHA-256); exit 2 names a bad shard")
    p.add_argument("data", help="records folder (mammodg build-tfrecords --out)")
    p.add_argument("--quick", action="store_true", help="sizes and record counts only (no SHA-256)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("make-phantoms", help="write synthetic mammograms (DICOM) in several vendor styles, manifest.csv and landmarks.json")
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
    p.add_argument("--stage", choices=("classifier", "contrastive", "detection", "matching", "birads", "density"),
                   help="default: the run's own stage")
    p.add_argument("--data", help="contrastive / detection / birads / density: evaluate this image-records folder "
                                  "instead (other vendors: unseen domains)")
    p.add_argument("--split", default="val")
    p.add_argument("--n-boot", type=int, default=2000)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="SavedModel(s) of a run with the serve_images / serve_examples signatures")
    p.add_argument("--run", required=True, help="run folder of a trained stage")
    p.add_argument("--out", help="output folder (default: <run>/saved_model)")
    p.set_defaults(func=cmd_export)

    args = parser.parse_args(argv)
    if not args.verbose:
        quiet_tensorflow()
    from mammodg.config import ConfigError
    from mammodg.io.manifest import ManifestError
    from mammodg.train import TrainingError

    try:
        return args.func(args)
    except (ConfigError, ManifestError, ValueError, FileNotFoundError) as e:  # bad input: named, nothing run
        print(f"mammodg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:  # a run stopped (NaN loss, damaged shard): the message names the step / file
        print(f"mammodg {args.command}: stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
