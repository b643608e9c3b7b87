"""Does contrastive pre-training help FCOS mass detection, and does the P2 level? (MSVCL v2 Table II, issue 18)

On phantoms at demo scale on CPU: makes phantom patients in several vendor styles and builds them into
records, trains a short multi-view contrastive run (MVCL: no CycleGAN needed) on them, then four
detection runs with the same data, budget and seed: {contrastive backbone, random backbone} x {P3-P7,
P2-P7}, and evaluates each on the validation split: AP at IoU 0.5 per style (data segment), overall,
COCO mAP and FROC. Writes ``results.md`` and ``results.json`` in ``--out``.

    python pipelines/detection_experiment.py [--out runs/detection_experiment] [--steps 60]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def phantom_records(out: Path, patients: int, size) -> Path:
    """Phantoms of ``patients`` patients in 3 styles, built into records of ``size`` (h, w)."""
    from mammodg.config import BuildConfig, PreprocessConfig
    from mammodg.phantom import make_phantoms
    from mammodg.records.writer import build

    records = out / "tfrecords"
    if not (records / "dataset.json").is_file():
        manifest = make_phantoms(out / "phantoms", patients=patients, styles=3, seed=7, scale=0.25, progress=False)
        build(manifest, records, BuildConfig(preprocess=PreprocessConfig(height=size[0], width=size[1]),
                                             pseudonym_salt="detection-experiment", workers=2), progress=False)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/detection_experiment")
    ap.add_argument("--patients", type=int, default=48)
    ap.add_argument("--size", type=int, nargs=2, default=[256, 192], help="records and detector input (h, w)")
    ap.add_argument("--contrastive-steps", type=int, default=40)
    ap.add_argument("--steps", type=int, default=60, help="detection steps per run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra detection overrides")
    args = ap.parse_args()

    from mammodg import stages
    from mammodg.config import TrainConfig, load
    from mammodg.demo import prepare_contrastive
    from mammodg.evaluate import evaluate_detection
    from mammodg.report import _md_cell

    out = Path(args.out)
    records = phantom_records(out, args.patients, args.size)
    t0 = time.perf_counter()
    con = load(TrainConfig, REPO / "mammodg" / "configs" / "demo" / "contrastive.yaml", [
        "stage=contrastive", f"data_dir={records}", f"run_dir={out / 'contrastive'}", f"steps={args.contrastive_steps}",
        f"val_every={args.contrastive_steps // 2}", "contrastive.method=mvcl", f"contrastive.pairs_dir={out / 'pairs'}", "contrastive.cyclegan_run=",
        "contrastive.cyclegan_config=", "contrastive.pair_size=[]", "contrastive.input_size=[128,96]",
        "contrastive.crop_scale=[0.3,0.6]", "contrastive.hidden_dim=256", "export=false"])
    if not (out / "contrastive" / "backbone.weights.h5").is_file():
        prepare_contrastive(con)
        stages.run("contrastive", con)
    contrastive_s = round(time.perf_counter() - t0, 1)
    variants = {f"{b}, {lv}": (src, levels) for b, src in (("contrastive", str(out / "contrastive")), ("random", ""))
                for lv, levels in (("P3-P7", "[3,4,5,6,7]"), ("P2-P7", "[2,3,4,5,6,7]"))}
    rows = {}
    for name, (src, levels) in variants.items():
        run_dir = out / name.replace(", ", "_").replace("-", "")
        cfg = load(TrainConfig, REPO / "mammodg" / "configs" / "demo" / "detection.yaml", [
            "stage=detection", f"data_dir={records}", f"run_dir={run_dir}", f"steps={args.steps}",
            f"val_every={args.steps // 2}", f"detection.input_size=[{args.size[0]},{args.size[1]}]",
            f"detection.backbone_from={src}", f"detection.levels={levels}", "export=false", *args.set])
        t = time.perf_counter()
        stages.run("detection", cfg)
        train_s = round(time.perf_counter() - t, 1)
        res = evaluate_detection(run_dir, split="val")
        report = json.loads(Path(res["json"]).read_text())
        rows[name] = {"ap50": res["ap50"], "map": res["map"], "per_style": report["table_ap50"][0]["seen"],
                      "froc": report["froc"]["all"]["sensitivity"], "train_s": train_s, "report": str(res["markdown"])}
    styles = sorted({s for r in rows.values() for s in r["per_style"]})

    def pct(v):
        return "n/a" if v is None or v != v else f"{100 * v:.1f}"

    lines = [f"# FCOS on phantoms: AP@0.5 (%) per style, validation split ({args.patients} patients, "
             f"{args.size[0]}x{args.size[1]}, {args.steps} detection steps per run, contrastive MVCL "
             f"{args.contrastive_steps} steps)", "",
             "| backbone, levels | " + " | ".join(_md_cell(s) for s in styles) + " | all | COCO mAP | FROC sens. @0.5/1/2/4 FP | train s |",
             "|---|" + "---:|" * (len(styles) + 4)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(pct(r["per_style"].get(s)) for s in styles)
                     + f" | {pct(r['ap50'])} | {pct(r['map'])} | {'/'.join(f'{v:.2f}' for v in r['froc'])} | {r['train_s']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "contrastive_s": contrastive_s, "runs": rows},
                                                 indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
