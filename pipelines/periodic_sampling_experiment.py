#!/usr/bin/env python
"""In-silico replication of the periodic-sampling paper's comparison of sampling strategies.

Paper: ``../shared/papers/periodic-sampling.txt``, section 3 (Table 1: data segments with very different
malignant rates; Table 2: AUC on a held-out segment; Figure 4: ROC / AUC on each training segment).

What it does, with the package only (nothing is re-implemented here):

1. **Segments** (``mammodg.phantom.make_phantoms``, one vendor style per call, manifest post-processed):

   * ``S1`` (style VendorA): a large segment with many malignant images. All malignant patients are kept
     and only ``--s1-benign-keep`` of the benign patients, so that ~30-35 % of its images are malignant
     (the paper's (S1, Ma): p_mal = 0.35).
   * ``S2`` (style VendorB): a segment with few positives and its own style: every benign patient but
     only ``--s2-malignant-patients`` malignant ones (the paper's (S2, Ma): p_mal = 0.007; here a few %),
     and more benign images than S1 (as in Table 1).
   * ``S3`` (style VendorC, unseen in training): the held-out test segment, natural phantom prevalence,
     forced into split ``test`` through the manifest's ``split`` column.

   As in the paper (3.1.1), a negative image is an image of a negative patient: label-0 images of
   malignant patients (their other breast, or a view where the lesion is not visible) are dropped.
   S1 and S2 are split patient-wise into train / val by the builder (``--val-fraction``, stratified by
   malignant patients within each source).
2. **Records**: ``mammodg.records.writer.build`` (segments = source x manufacturer, small images).
3. **Training**: ``mammodg.stages.run``: the patch stage once (A.3, seed ``--data-seed``, shared by every
   training seed), then, for each training seed of ``--seeds``, the classifier stage from that backbone once per
   strategy (periodic, balanced_labels, balanced_segments, natural) and once as the paper's baseline (1): a
   classifier trained and validated on one data segment only (``--baseline-segment``, default S1, the large
   one) with balanced labels (a single-segment view of the records, ``experiment_tools.segment_view``). Same
   steps and everything else; the seed changes the sampling order, augmentation draws and head initialisation.
   The data (phantoms, records, splits) are one draw (``--data-seed``). The checkpoint kept is the one with the
   best *global* val WLL (paper 3.1.2). Demo scale: 256x192 images and a 5-block backbone (``--filters``;
   minimum input 96 px) pre-trained on 96 px patches. With the paper's 6 blocks the patches must be >= 192 px,
   i.e. about the whole 256x192 image, and the patch stage barely learns (measured on these data: patch val
   accuracy 0.37 after 600 steps vs 0.79 with 96 px patches after 1200; classifier in-segment val AUC ~0.6 vs
   ~0.85).
4. **Evaluation**, per seed: ``stages.classifier.image_scores`` on the val split (each training segment and
   pooled) and on the held-out ``test`` split; ``mammodg.metrics.classification``: AUC with 95 % bootstrap CIs
   (``--n-boot`` Efron resamples) and paired ``bootstrap_delta_auc`` of each model against Bal. labels and
   against the baseline (the paper's Tables 2/3: ΔAUC = AUC(model) - AUC(reference)). Over seeds: mean, std
   (ddof 1) and min-max of every AUC and ΔAUC, and how many seeds give a significant ΔAUC of each sign.

Outputs in ``--out`` (default ``runs/periodic_sampling_experiment``): ``phantoms/`` + ``manifest.csv``,
``tfrecords/`` (+ ``tfrecords_<segment>/``, the baseline's view), ``runs/patch`` and
``runs/seed<k>/<model>/`` (trainer run folders), ``scores/seed<k>/<model>_<split>.csv``, ``results.json`` and
``results.md`` (also printed; rewritten after each seed, so a stopped run still reports its finished seeds).

    .venv/bin/python pipelines/periodic_sampling_experiment.py --seeds 0 1 2
    .venv/bin/python pipelines/periodic_sampling_experiment.py --steps 3000 --width 0.25 --fresh

Every step is resumable (the builder and the trainer resume); re-running with other arguments on the same
``--out`` is refused unless ``--fresh`` (which deletes ``--out`` first); other ``--seeds`` are allowed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

STRATEGIES = ("periodic", "balanced_labels", "balanced_segments", "natural")
STRATEGY_NAMES = {"periodic": "P. sampling", "balanced_labels": "Bal. labels",
                  "balanced_segments": "Bal. segments", "natural": "natural"}
# segment id -> index of the vendor style in mammodg.phantom.default_styles(3)
SEGMENT_STYLE = {"S1": 0, "S2": 1, "S3": 2}
SALT = "periodic-sampling-experiment"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/periodic_sampling_experiment", help="output folder")
    g = p.add_argument_group("segments (phantom patients rendered per segment, before selection)")
    g.add_argument("--s1-patients", type=int, default=400, help="S1 (VendorA): large, many positives")
    g.add_argument("--s1-benign-keep", type=float, default=0.55,
                   help="fraction of S1's benign patients kept (raises S1's malignant rate)")
    g.add_argument("--s2-patients", type=int, default=500, help="S2 (VendorB): few positives")
    g.add_argument("--s2-malignant-patients", type=int, default=24, help="malignant patients kept in S2")
    g.add_argument("--s3-patients", type=int, default=150, help="S3 (VendorC): held-out test segment")
    g.add_argument("--scale", type=float, default=0.25, help="phantom rendering scale (1 = ~1200x960 px)")
    g.add_argument("--val-fraction", type=float, default=0.25, help="patients of S1/S2 put in val")
    g = p.add_argument_group("images and training")
    g.add_argument("--height", type=int, default=256, help="preprocessed image height")
    g.add_argument("--width-px", type=int, default=192, help="preprocessed image width (>= the VGG's minimum)")
    g.add_argument("--width", type=float, default=0.125, help="model width multiplier")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--filters", default="32,64,128,256,512",
                   help="backbone block kernels before --width (TrainConfig.filters). 5 blocks: minimum input "
                        "96 px; the paper's 6 blocks (32,64,128,256,256,512) need >= 192 px patches, which on "
                        "256x192 images cover the whole breast and the patch stage then learns little")
    g.add_argument("--patch-steps", type=int, default=1200, help="patch pre-training steps (once)")
    g.add_argument("--patch-size", type=int, default=96, help="patch stage crop size (>= 6 * 2**(blocks - 1))")
    g.add_argument("--steps", type=int, default=1200, help="classifier steps, per strategy")
    g.add_argument("--val-every", type=int, default=200, help="validation / checkpoint cadence")
    g.add_argument("--patch-lr", type=float, default=1e-3)
    g.add_argument("--lr", type=float, default=3e-4, help="classifier learning rate")
    g.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated subset")
    g.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for CIs and delta AUC")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (run one after another)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the phantoms, the split and the patch stage")
    g.add_argument("--baseline-segment", default="S1", help="source of the single-segment baseline's segment")
    g.add_argument("--workers", type=int, default=0, help="builder processes (0 = all cores)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    args.filters = [int(v) for v in str(args.filters).split(",") if v.strip()]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad:
        p.error(f"unknown strategies {bad}; choose from {STRATEGIES}")
    if args.steps % args.val_every or args.patch_steps % min(args.val_every, args.patch_steps):
        p.error("--steps must be a multiple of --val-every")
    return args


# --------------------------------------------------------------------------------------------- data
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_segments(args, out: Path) -> tuple[Path, dict]:
    """Render the three segments with make_phantoms and write the shaped, combined manifest."""
    from mammodg.io.manifest import OPTIONAL, REQUIRED
    from mammodg.phantom import default_styles, make_phantoms

    styles = default_styles(3)
    spec = {"S1": args.s1_patients, "S2": args.s2_patients, "S3": args.s3_patients}
    cols = list(REQUIRED + OPTIONAL)
    kept_rows, summary = [], {}
    for k, (seg, n_patients) in enumerate(spec.items()):
        style = styles[SEGMENT_STYLE[seg]]
        folder = out / "phantoms" / seg
        manifest = folder / "manifest.csv"
        if not manifest.is_file():  # make_phantoms writes the manifest last
            make_phantoms(folder, patients=n_patients, styles=[style], seed=args.data_seed * 1000 + 11 * (k + 1),
                          scale=args.scale, source=seg, progress=False)
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        by_patient: dict[str, list[dict]] = {}
        for r in rows:
            by_patient.setdefault(r["patient_id"], []).append(r)
        malignant = sorted(p for p, rs in by_patient.items() if any(r["label"] == "1" for r in rs))
        benign = sorted(p for p, rs in by_patient.items() if p not in set(malignant))
        rng = np.random.default_rng([args.data_seed, 7, k])
        if seg == "S1":
            n_keep = int(round(args.s1_benign_keep * len(benign)))
            benign = sorted(rng.choice(benign, size=n_keep, replace=False).tolist()) if n_keep < len(benign) else benign
        elif seg == "S2":
            n_keep = min(args.s2_malignant_patients, len(malignant))
            malignant = sorted(rng.choice(malignant, size=n_keep, replace=False).tolist())
        keep = set(malignant) | set(benign)
        n_img = [0, 0]
        for p in sorted(keep):
            for r in by_patient[p]:
                if p in malignant and r["label"] == "0":
                    continue  # paper 3.1.1: negative images come from negative patients only
                r = dict(r)
                r["image_path"] = str(Path("phantoms") / seg / r["image_path"])
                r["source"] = seg
                r["split"] = "test" if seg == "S3" else ""
                kept_rows.append({c: r.get(c, "") for c in cols})
                n_img[int(r["label"])] += 1
        summary[seg] = {"style": style.name, "role": "held-out test" if seg == "S3" else "training",
                        "patients_rendered": n_patients, "patients_kept": len(keep),
                        "malignant_patients": len(malignant), "benign_images": n_img[0],
                        "malignant_images": n_img[1], "p_mal": n_img[1] / max(1, sum(n_img))}
    combined = out / "manifest.csv"
    with open(combined, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        w.writerows(kept_rows)
    return combined, summary


def build_records(args, manifest: Path, out: Path) -> dict:
    from mammodg.config import BuildConfig, PreprocessConfig
    from mammodg.records.writer import build, format_summary

    cfg = BuildConfig(preprocess=PreprocessConfig(height=args.height, width=args.width_px),
                      val_fraction=args.val_fraction, seed=args.data_seed, pseudonym_salt=SALT, workers=args.workers)
    index = build(manifest, out, cfg, progress=False)
    print(format_summary(index), flush=True)
    if index["rejected"]:
        raise SystemExit(f"{index['rejected']} phantom image(s) rejected, see {out / 'rejects.csv'}")
    return index


# ------------------------------------------------------------------------------------------ training
def train_config(args, data_dir: Path, run_dir: Path, seed: int, init_from: str = "", **kw):
    from mammodg.config import TrainConfig

    base = dict(data_dir=str(data_dir), run_dir=str(run_dir), batch_size=args.batch_size, seed=seed,
                export=False, val_max_batches=0, target_mean=0.25)
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.vgg.width, cfg.vgg.filters = args.width, list(args.filters)
    cfg.patch.patch_size, cfg.classifier.init_from = args.patch_size, init_from
    return cfg


def sampling_shares(data_dir: Path, strategy: str, seed: int) -> dict:
    """Expected share of each (segment, label) in the training batches of a strategy (one period)."""
    from mammodg.records.reader import load_index, streams
    from mammodg.sampling.streams import make_plan

    index = load_index(data_dir)
    plan = make_plan(index, data_dir, "train", strategy, seed)
    counts = {k: c for k, (_, c) in streams(index, data_dir, "train").items()}
    per_key = np.bincount(plan.choices, minlength=len(plan.keys)) / len(plan.choices)
    out: dict[str, float] = {}
    for (seg, lab), share in zip(plan.keys, per_key):
        members = {k: c for k, c in counts.items() if (seg == "*" or k[0] == seg) and (lab == "*" or k[1] == lab)}
        total = sum(members.values())
        for (s, l), c in members.items():  # a pooled stream gives each member its share of the records
            out[f"{s}|label{l}"] = out.get(f"{s}|label{l}", 0.0) + float(share) * c / total
    return dict(sorted(out.items()))


def scores_of(model, cfg, split: str):
    from mammodg.stages.classifier import image_scores

    p, y, segs = image_scores(model, cfg, split)
    return np.asarray(p, np.float64), np.asarray(y, np.int64), np.asarray(segs).astype(str)


def write_scores(path: Path, p, y, segs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["segment", "label", "score"])
        for s, lab, sc in zip(segs, y, p):
            w.writerow([s, int(lab), f"{sc:.6g}"])


# ----------------------------------------------------------------------------------------------- main
def _check_params(out: Path, args) -> None:
    params = {k: v for k, v in vars(args).items() if k not in ("out", "fresh", "n_boot", "workers", "strategies", "seeds")}
    path = out / "experiment_args.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != params:
            diff = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
            raise SystemExit(f"{out} was made with other arguments ({', '.join(diff)}); use --fresh or another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(params, indent=1))


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    _check_params(out, args)
    from experiment_tools import segment_view
    from periodic_report import aggregate, evaluate, markdown, narrative, paired_deltas, to_json

    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    _log("rendering phantom segments")
    manifest, seg_summary = make_segments(args, out)
    timing["phantoms"] = time.perf_counter() - t0
    for s, d in seg_summary.items():
        _log(f"  {s} ({d['style']}, {d['role']}): {d['patients_kept']} patients, {d['benign_images']}-/"
             f"{d['malignant_images']}+ images, p_mal {d['p_mal']:.3f}")

    t0 = time.perf_counter()
    _log("building TFRecords")
    data_dir = out / "tfrecords"
    index = build_records(args, manifest, data_dir)
    base_segs = sorted(s for s in index["splits"]["train"] if s.split("|")[0] == args.baseline_segment)
    if not base_segs:
        raise SystemExit(f"--baseline-segment {args.baseline_segment}: no such source in the train split")
    base_dir = out / f"tfrecords_{args.baseline_segment}"
    segment_view(data_dir, base_dir, base_segs)
    timing["build"] = time.perf_counter() - t0

    import keras  # noqa: F401  (after the builder's worker pool)

    from mammodg import stages

    t0 = time.perf_counter()
    patch_dir = out / "runs" / "patch"
    _log(f"patch pre-training ({args.patch_steps} steps, seed {args.data_seed}, shared by every seed)")
    stages.run("patch", train_config(args, data_dir, patch_dir, args.data_seed, stage="patch", steps=args.patch_steps,
                                     val_every=min(args.val_every, args.patch_steps), learning_rate=args.patch_lr))
    timing["patch"] = time.perf_counter() - t0

    models = {m: (data_dir, m) for m in args.strategies} | {"baseline": (base_dir, "balanced_labels")}
    names = STRATEGY_NAMES | {"baseline": f"{args.baseline_segment} only"}
    train_counts = {seg: {lab: v.get(lab, {}).get("count", 0) for lab in ("0", "1")}
                    for seg, v in index["splits"].get("train", {}).items()}
    results = {
        "paper": "periodic-sampling (section 3, Tables 1-3, Figure 4), in silico with mammodg phantoms",
        "args": vars(args) | {"strategies": args.strategies}, "names": names, "baseline_segments": base_segs,
        "segments": seg_summary, "train_counts": train_counts,
        "dataset_splits": {sp: {seg: {lab: e["count"] for lab, e in v.items()} for seg, v in segs.items()}
                           for sp, segs in index["splits"].items()},
        "sampling_shares": {m: sampling_shares(d, s, args.data_seed) for m, (d, s) in models.items()},
        "seeds": {}, "timing": timing,
    }
    for seed in args.seeds:
        t0 = time.perf_counter()
        raw, per_model = {}, {}
        for m, (train_dir, strategy) in models.items():
            _log(f"seed {seed}: classifier {names[m]} ({strategy} on {train_dir.name}, {args.steps} steps)")
            run_dir = out / "runs" / f"seed{seed}" / m
            cfg = train_config(args, train_dir, run_dir, seed, stage="classifier", strategy=strategy, steps=args.steps,
                               val_every=args.val_every, learning_rate=args.lr, init_from=str(patch_dir))
            model = stages.run("classifier", cfg)
            state = json.loads((run_dir / "state.json").read_text())
            eval_cfg = train_config(args, data_dir, run_dir, seed)  # every model is scored on the full splits
            raw[m] = {split: scores_of(model, eval_cfg, split) for split in ("val", "test")}
            for split, (p, y, segs) in raw[m].items():
                write_scores(out / "scores" / f"seed{seed}" / f"{m}_{split}.csv", p, y, segs)
            per_model[m] = {"best_step": state.get("best_step"), "best_val_wll": state.get("best"),
                            "auc": evaluate(raw[m], args.n_boot, seed)}
            del model
            keras.backend.clear_session()
        results["seeds"][seed] = {"models": per_model,
                                  "delta": paired_deltas(raw, ("balanced_labels", "baseline"), args.n_boot, seed)}
        timing[f"seed {seed}"] = time.perf_counter() - t0
        timing["total_s"] = time.perf_counter() - t_start
        results["columns"] = list(next(iter(per_model.values()))["auc"])
        rare = min(train_counts, key=lambda s: train_counts[s]["1"])
        results["rare_column"] = f"val:{rare}"
        results["aggregate"] = aggregate(results["seeds"])
        results["narrative"] = narrative(results)
        results["timing"] = {k: round(v, 1) for k, v in timing.items()}
        md = markdown(results)
        (out / "results.json").write_text(json.dumps(to_json(results), indent=1))
        (out / "results.md").write_text(md)
        _log(f"seed {seed} done ({timing[f'seed {seed}']:.0f} s); results so far in {out / 'results.md'}")
    print("\n" + md, flush=True)
    _log(f"done in {timing['total_s']:.0f} s; results in {out / 'results.md'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
