"""Does multi-style / multi-view pre-training make the backbone vendor-style invariant? (MSVCL v2, Fig. 7)

Trains the contrastive stage with several methods (default SimCLR, MSCL, MVCL, MSVCL) and seeds on the
same data, pair records and budget (the demo configuration unless ``--config`` is given), then measures on
held-out images the vendor-style accuracy of a linear probe on frozen embeddings (lower = more invariant,
folds grouped by patient) for each backbone and for a randomly initialised one of the same seed, with
t-SNE figures. Beside it, each run's last validation top-1 per pair type, its chance level and the
one-sided binomial p-value: did the backbone learn its own task? The CycleGAN run and the pair records
(the config's ``contrastive.cyclegan_run`` / ``pairs_dir``) are made once and shared by every method and
seed; a seed changes the initialisation, the sampled batches and the augmentations. Writes ``results.md``
and ``results.json`` (mean, std and min-max over seeds per method) in ``--out``; finished runs and their
evaluations are reused, so seeds can be run by separate processes and aggregated by a last call.

    python pipelines/contrastive_invariance_experiment.py [--steps 100] [--methods simclr msvcl] [--seeds 0 1 2]
        [--heldout-patients 15]   # probe new phantom patients, each rendered in every style
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

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


def last_validations(run: Path, method: str, last: int = 2) -> dict:
    """Per pair type: the last validation's top-1, chance and binomial p, and whether top-1 was clearly
    above chance (p < CLEAR_P) in each of the ``last`` validations."""
    from mammodg.augment import pair_types
    from mammodg.stages.contrastive_report import CLEAR_P

    history = [h["global"] for h in json.loads((run / "history.json").read_text())]
    return {kind: {"top1": history[-1][f"{kind}_top1"], "chance": history[-1][f"{kind}_top1_chance"],
                   "p": history[-1][f"{kind}_top1_p"], "anchors": history[-1][f"{kind}_anchors"],
                   "clear_last": len(history) >= last and all(h[f"{kind}_top1_p"] < CLEAR_P for h in history[-last:])}
            for kind in pair_types(method)}


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


def fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def report(runs: dict, methods: list, seeds: list, args, probe: dict) -> tuple[str, dict]:
    """results.md text and results.json content from the per-run rows ``runs[(seed, method)]``."""
    from mammodg.stages.contrastive_report import CLEAR_P

    done = {m: [s for s in seeds if (s, m) in runs] for m in methods}  # a stopped experiment: the seeds each has
    seeds = sorted({s for m in methods for s in done[m]})
    summary = {m: {"seeds": done[m], "style_accuracy": spread([runs[s, m]["style_accuracy"] for s in done[m]])}
               for m in methods if done[m]}
    for m in summary:  # the projection head's output, where a run has it
        if all("style_accuracy_projection" in runs[s, m] for s in done[m]):
            summary[m]["style_accuracy_projection"] = spread([runs[s, m]["style_accuracy_projection"] for s in done[m]])
    base = done[methods[0]]  # the random baselines, evaluated with each seed's first method
    summary["random init"] = {"seeds": base, "style_accuracy": spread([runs[s, methods[0]]["style_accuracy_random_init"] for s in base])}
    summary["random init, data BatchNorm"] = {"seeds": base, "style_accuracy": spread(
        [runs[s, methods[0]]["style_accuracy_random_init_data_bn"] for s in base])}
    for m in methods:
        for kind in runs[done[m][0], m]["validation"] if done[m] else ():
            vals = [runs[s, m]["validation"][kind] for s in done[m]]
            summary[m][kind] = {"top1": spread([v["top1"] for v in vals]), "chance": float(np.mean([v["chance"] for v in vals])),
                                "seeds_clear": sum(v["clear_last"] for v in vals)}
    lines = [f"# Contrastive invariance: vendor-style linear probe, {len(seeds)} seed(s) {seeds}", "",
             f"Probe on {args.data or 'the runs own data'} ({args.split} split): {probe['images']} images of "
             f"{probe['patients']} patients, {probe['folds']}-fold grouped by patient; lower = more style-invariant; "
             f"chance (majority style) {probe['chance']:.3f}. {args.steps} steps per run, config {args.config}"
             f"{' ' + ' '.join(args.set) if args.set else ''}. The CycleGAN run and the pair records are shared by "
             "every method and seed. Figures: mean ± sample std [min, max] over seeds.", "",
             f"Learned its task: top-1 of the last validation per pair type (chance in brackets); 'clear' counts the "
             f"seeds whose top-1 was above chance with one-sided binomial p < {CLEAR_P} in each of the last two validations.", "",
             "| backbone | style accuracy | projection head output | last-validation top-1 per pair type (chance), "
             "seeds clear |", "|---|---|---|---|"]
    for m, row in summary.items():
        tasks = "; ".join(f"{kind} {fmt(v['top1'])} ({v['chance']:.3f}), {v['seeds_clear']}/{len(row['seeds'])} clear"
                          for kind, v in row.items() if kind not in ("seeds", "style_accuracy", "style_accuracy_projection"))
        head = fmt(row["style_accuracy_projection"]) if "style_accuracy_projection" in row else ""
        lines.append(f"| {m} (seeds {', '.join(map(str, row['seeds']))}) | {fmt(row['style_accuracy'])} | {head} | {tasks} |")
    lines += ["", "Per run:", "", "| seed | method | style accuracy | random init | last validation: top-1 (chance, p) | train s |",
              "|---|---|---|---|---|---|"]
    for s in seeds:
        for m in (m for m in methods if (s, m) in runs):
            r = runs[s, m]
            val = "; ".join(f"{k} {v['top1']:.3f} ({v['chance']:.3f}, p {v['p']:.1e})" for k, v in r["validation"].items())
            lines.append(f"| {s} | {m} | {r['style_accuracy']:.3f} | {runs[s, methods[0]]['style_accuracy_random_init']:.3f} "
                         f"| {val} | {r['train_s'] or ''} |")
    result = {"seeds": seeds, "steps": args.steps, "config": args.config, "overrides": args.set, "data": args.data,
              "split": args.split, "probe": probe, "summary": summary,
              "runs": {f"seed{s}/{m}": {k: str(v) if isinstance(v, Path) else v for k, v in runs[s, m].items()}
                       for s, m in runs}}
    return "\n".join(lines) + "\n", result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo" / "contrastive.yaml"))
    ap.add_argument("--methods", nargs="+", default=["simclr", "mscl", "mvcl", "msvcl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--split", default="val", help="held-out images for the probe")
    ap.add_argument("--data", help="probe this image-records folder (e.g. phantoms of new patients, "
                    "mammodg make-phantoms --all-styles + build-tfrecords) instead of the runs' own data")
    ap.add_argument("--heldout-patients", type=int, default=0,
                    help="make this many new phantom patients (seed 101), each in every style, and probe all "
                         "their images (sets --data and --split train)")
    ap.add_argument("--out", default="runs/contrastive_invariance")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--report-only", action="store_true", help="train nothing: aggregate the finished runs in --out")
    args = ap.parse_args()

    from mammodg import stages
    from mammodg.config import TrainConfig, load
    from mammodg.demo import prepare_contrastive
    from mammodg.evaluate import evaluate_contrastive

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.heldout_patients:
        args.data, args.split = str(heldout_phantoms(out / "heldout", args.heldout_patients, args.config)), "train"
    runs, t0, text = {}, time.perf_counter(), ""
    for seed in args.seeds:  # seeds outermost: a stopped experiment leaves whole seeds
        for method in args.methods:
            run = out / f"seed{seed}" / method
            if args.report_only and not (run / "backbone.weights.h5").is_file():
                continue
            cfg = load(TrainConfig, args.config, args.set + [
                "stage=contrastive", f"run_dir={run}", f"contrastive.method={method}", f"steps={args.steps}",
                f"seed={seed}", f"val_every={args.steps // 2 if args.steps % 2 == 0 else args.steps}"])
            t, train_s = time.perf_counter(), None
            if not args.report_only:
                prepare_contrastive(cfg)  # the shared CycleGAN run and pair records: made by the first run only
                stages.run("contrastive", cfg)
                train_s = round(time.perf_counter() - t, 1)
            first = method == args.methods[0]  # the random baselines depend on the seed only: once per seed
            runs[seed, method] = evaluate_contrastive(run, split=args.split, data_dir=args.data, baselines=first,
                                                      reuse=True) | {
                "train_s": train_s, "validation": last_validations(run, method)}
            if method != args.methods[-1] and not args.report_only:
                continue
            probe = json.loads(Path(runs[seed, method]["json"]).read_text())["probe_trained"]
            text, result = report(runs, args.methods, args.seeds, args, probe)  # after each complete seed
            (out / "results.md").write_text(text + f"\nWall time so far: {time.perf_counter() - t0:.0f} s.\n")
            (out / "results.json").write_text(json.dumps(result | {"wall_s": round(time.perf_counter() - t0)}, indent=1))
    print(text if runs else f"no finished runs in {out}")


if __name__ == "__main__":
    main()
