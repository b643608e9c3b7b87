"""The MSVCL v2 leave-vendors-out protocol (section IV, Table III and Figure 6), driven by a config.

Styles (data segments) are split into seen and unseen. The records are built once, the unseen styles' rows
in split ``test`` (never trained on), the seen styles' patients in ``train`` / ``val``. On the seen styles
only: a CycleGAN between them and the pair records with their transfers; contrastive pre-training for each
method (``random``: the same encoder, randomly initialised, no pre-training); then the four downstream
tasks fine-tuned from each method's encoder (``mammodg.stages.run``), scored by ``mammodg.evaluate`` on the
seen styles' ``val`` split and on the unseen styles' ``test`` split, per domain with seen / unseen averages.
The tasks of ``fraction_tasks`` are also trained at each ``label_fractions`` value (Figure 6).

Every cell writes its result file under ``out_dir``; a cell whose file exists is not recomputed (resume by
running the same command again). Writes ``table3.md``, ``figure6.png``, ``results.json``.

    PYTHONPATH=. python pipelines/msvcl_v2.py --config configs/protocol/demo.yaml [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = ("detection", "matching", "birads", "density")
TITLES = {"detection": "Detection (AP@0.5)", "matching": "Match (acc.)", "birads": "BI-RADS (acc.)",
          "density": "Density (acc.)"}


def cell(path: Path, compute, log=print) -> dict:
    """The result of one cell: ``path`` (JSON) when it exists, else ``compute()`` written there with its wall time."""
    if path.is_file():
        log(f"[done] {path.name}")
        return json.loads(path.read_text())
    log(f"[run ] {path.name}", flush=True)
    t = time.perf_counter()
    result = {**compute(), "wall_s": 0.0}
    result["wall_s"] = round(time.perf_counter() - t, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # atomic: an interrupted cell leaves no result file
    return result


def train_config(spec: dict, stage: str, overrides: list[str]):
    from mammodg.config import TrainConfig, load

    s = spec["stages"][stage]
    sets = list(s.get("set", [])) + [f"stage={stage}", f"seed={spec['seed']}"]
    return load(TrainConfig, s["config"], sets + overrides)


# ----------------------------------------------------------------------------------------------- data
def segment_of(row: dict, keys) -> str:
    return "|".join(row.get(k) or "UNKNOWN" for k in keys)


def build_data(spec: dict, out: Path) -> dict:
    """Records with the unseen styles' rows in split ``test``: from ``data.manifest`` or from phantoms made here."""
    from mammodg.config import BuildConfig, load
    from mammodg.records.writer import build

    d = spec["data"]
    cfg = load(BuildConfig, None, [f"{k}={json.dumps(v)}" for k, v in d.get("build", {}).items()])
    if d.get("manifest"):
        source = Path(d["manifest"])
    else:
        from mammodg.phantom import make_phantoms

        p = d["phantoms"]
        source = make_phantoms(out / "phantoms", patients=p["patients"], styles=p["styles"], seed=p.get("seed", 0),
                               scale=p["scale"], progress=False)
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["image_path"] = str((source.parent / r["image_path"]).resolve())
        if not r.get("manufacturer"):  # as the builder does: the DICOM header's
            import pydicom

            header = pydicom.dcmread(r["image_path"], stop_before_pixels=True)
            r["manufacturer"] = str(header.get("Manufacturer", "")).strip()
    rows = [r for r in rows if segment_of(r, cfg.segment_keys) in d["seen"] + d["unseen"]]  # other styles: left out
    if not rows:
        raise ValueError(f"no manifest row of {source} is in the seen or unseen styles {d['seen'] + d['unseen']}")
    for r in rows:
        r["split"] = "test" if segment_of(r, cfg.segment_keys) in d["unseen"] else ""
    manifest = out / "protocol_manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    index = build(manifest, out / "records", cfg, progress=False)
    manifest.unlink()  # patient ids and paths: the builder's provenance.csv keeps what is needed
    found = {split: sorted(segs) for split, segs in index["splits"].items()}
    if set(found.get("test", [])) != set(d["unseen"]) or not set(found.get("train", [])) <= set(d["seen"]):
        raise ValueError(f"the built splits {found} do not follow seen {d['seen']} / unseen {d['unseen']}")
    images = {split: sum(e["count"] for seg in segs.values() for e in seg.values())
              for split, segs in index["splits"].items()}
    return {"splits": found, "records": index["records"], "images_per_split": images}


# ----------------------------------------------------------------------------------- pre-training
def style_cells(spec: dict, out: Path, data: Path) -> Path:
    """CycleGAN between the seen styles, then the pair records with their transfers; returns the pairs folder."""
    from mammodg.records.pairs import build_pairs
    from mammodg.records.styles import StyleTransfer
    from mammodg.stages import run

    gan, pairs = out / "cyclegan", out / "pairs"

    def train_gan():
        styles = json.dumps(spec["data"]["seen"])
        sets = [f"data_dir={data}", f"run_dir={gan}", f"cyclegan.styles={styles}"]
        run("cyclegan", train_config(spec, "cyclegan", sets))
        return {"run": str(gan)}

    def make_pairs():
        size = train_config(spec, "contrastive", []).contrastive.pair_size
        build_pairs(data, pairs, transfer=StyleTransfer.load(gan), size=tuple(size) or None, progress=False)
        return {"pairs": str(pairs)}

    cell(out / "cells" / "cyclegan.json", train_gan)
    cell(out / "cells" / "pairs.json", make_pairs)
    return pairs


def random_encoder(cfg, run_dir: Path) -> dict:
    """``random``: the contrastive encoder as initialised (seeded), saved like a contrastive run's."""
    import keras

    from mammodg.config import save
    from mammodg.models.resnet import build_backbone

    keras.utils.set_random_seed(cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    c = cfg.contrastive
    build_backbone(c.backbone, (*c.input_size, 1), width=c.width).save_weights(run_dir / "backbone.weights.h5")
    save(cfg, run_dir / "config.yaml")
    return {"run": str(run_dir)}


def pretrain(spec: dict, out: Path, data: Path, pairs: Path, method: str) -> dict:
    from mammodg.stages import run

    run_dir = out / "pretrain" / method
    cfg = train_config(spec, "contrastive", [
        f"data_dir={data}", f"run_dir={run_dir}", f"contrastive.pairs_dir={pairs}",
        f"contrastive.cyclegan_run={out / 'cyclegan'}", "contrastive.cyclegan_config=''",
        f"contrastive.method={'simclr' if method == 'random' else method}"])
    if method == "random":
        return random_encoder(cfg, run_dir)
    run("contrastive", cfg)
    return {"run": str(run_dir)}


# ------------------------------------------------------------------------------------ downstream
def score(task: str, run_dir: Path, split: str) -> dict:
    """Per-domain score of a finished run on ``split`` (``mammodg.evaluate``) and its reference level."""
    from mammodg import evaluate

    if task == "detection":
        rep = json.loads(Path(evaluate.evaluate_detection(run_dir, split=split, overlays=0)["json"]).read_text())
        row = rep["table_ap50"][0]
        g = rep["global"]
        return {"domains": {**row["seen"], **row["unseen"]}, "reference": None, "images": g["n_images"],
                "lesions": g["n_lesions"]}
    if task == "matching":
        rep = evaluate.evaluate_matching(run_dir, split=split)
        return {"domains": {k: v["accuracy"] for k, v in rep["domains"].items()}, "reference": 0.5,
                "ap50_change": rep["ap50_change"], "pairs": rep["pairs"], "positives": rep["positives"],
                "no_match_rate": {k: 1 - v["positives"] / v["pairs"] for k, v in rep["domains"].items()}}
    rep = json.loads(Path(evaluate.evaluate_downstream(run_dir, split=split, n_boot=200)["json"]).read_text())
    return {"domains": {d: v["accuracy"] for d, v in rep["domains"].items()},
            "reference": rep["global"]["majority_rate"], "samples": rep["n"]}


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def downstream(spec: dict, out: Path, data: Path, pairs: Path, task: str, method: str, fraction: float) -> dict:
    from mammodg.stages import run

    run_dir = out / task / f"{method}_f{fraction:g}"
    sets = [f"data_dir={data}", f"run_dir={run_dir}", f"label_fraction={fraction}",
            f"{task}.backbone_from={out / 'pretrain' / method}"]
    if task == "density":
        sets.append(f"density.pairs_dir={pairs}")
    if task == "matching" and train_config(spec, task, []).matching.detection_run:  # candidates: this method's detector
        sets.append(f"matching.detection_run={out / 'detection' / f'{method}_f1'}")
    run(task, train_config(spec, task, sets))
    seen, unseen = score(task, run_dir, "val"), score(task, run_dir, "test")
    return {"task": task, "method": method, "fraction": fraction, "seen": seen, "unseen": unseen,
            "seen_avg": mean(seen["domains"].values()), "unseen_avg": mean(unseen["domains"].values())}


# --------------------------------------------------------------------------------------- reports
def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def table3(cells: dict, methods, tasks) -> str:
    """Markdown shaped like Table III: rows = methods; seen and unseen averages per task and their mean."""
    head = [f"{TITLES[t]}" for t in tasks]
    lines = ["| Pre-training | " + " | ".join(f"Seen {h}" for h in head) + " | Seen avg. | "
             + " | ".join(f"Unseen {h}" for h in head) + " | Unseen avg. |",
             "|---|" + "---:|" * (2 * len(tasks) + 2)]
    for m in methods:
        row = [cells[(t, m, 1.0)] for t in tasks]
        s, u = [r["seen_avg"] for r in row], [r["unseen_avg"] for r in row]
        lines.append(f"| {m} | " + " | ".join(map(pct, s)) + f" | {pct(mean(s))} | "
                     + " | ".join(map(pct, u)) + f" | {pct(mean(u))} |")
    return "\n".join(lines) + "\n"


def figure6(cells: dict, methods, fractions, task: str, path: Path) -> dict:
    """Unseen-domain average of ``task`` against the label fraction, one line per method (Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {m: [cells[(task, m, f)]["unseen_avg"] for f in fractions] for m in methods}
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, ys in curves.items():
        ax.plot(fractions, [float("nan") if y is None else 100 * y for y in ys], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("label fraction")
    ax.set_ylabel(f"unseen-domain {TITLES[task]} (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"task": task, "fractions": list(fractions), "unseen_avg": curves}


METHODS = ("random", "simclr", "mscl", "mvcl", "msvcl")


def check_spec(path) -> dict:
    """The protocol spec at ``path``, checked before any work: its sections, methods and tasks, and every stage
    config it names loads with its overrides. Raises ValueError naming the file and the field."""
    from mammodg.config import TrainConfig, load

    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: not a mapping of protocol settings")
    for key in ("out_dir", "data", "methods", "stages"):
        if key not in spec:
            raise ValueError(f"{path}: missing field {key!r}")
    for key in ("seen", "unseen"):
        if not spec["data"].get(key):
            raise ValueError(f"{path}: data.{key} must list data segments (source|manufacturer)")
    bad = sorted(set(spec["methods"]) - set(METHODS)) + sorted(set(spec.get("tasks", TASKS)) - set(TASKS))
    if bad:
        raise ValueError(f"{path}: unknown method(s)/task(s) {bad}; methods {list(METHODS)}, tasks {list(TASKS)}")
    needed = {"cyclegan", "contrastive", *spec.get("tasks", TASKS)}
    if needed - set(spec["stages"]):
        raise ValueError(f"{path}: stages lacks {sorted(needed - set(spec['stages']))}")
    for stage, st in spec["stages"].items():
        try:
            load(TrainConfig, st["config"], list(st.get("set", [])) + [f"stage={stage}"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: stages.{stage}: {e}") from None
    return spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "mammodg" / "configs" / "protocol" / "demo.yaml"))
    ap.add_argument("--out", help="output folder (default: the config's out_dir)")
    args = ap.parse_args(argv)
    try:
        spec = check_spec(args.config)
    except (OSError, ValueError, yaml.YAMLError) as e:  # ConfigError is a ValueError
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    out = Path(args.out or spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    methods, tasks = spec["methods"], spec.get("tasks", list(TASKS))
    fractions = sorted({float(f) for f in spec.get("label_fractions", [1.0])} | {1.0})
    data_info = cell(out / "cells" / "data.json", lambda: build_data(spec, out))
    data = out / "records"
    pairs = style_cells(spec, out, data)
    for m in methods:
        cell(out / "cells" / f"pretrain_{m}.json", lambda m=m: pretrain(spec, out, data, pairs, m))
    cells = {}
    for t in tasks:
        for f in (fractions if t in spec.get("fraction_tasks", []) else [1.0]):
            for m in methods:
                cells[(t, m, f)] = cell(out / "cells" / f"{t}_{m}_f{f:g}.json",
                                        lambda t=t, m=m, f=f: downstream(spec, out, data, pairs, t, m, f))
    (out / "table3.md").write_text(table3(cells, methods, tasks))
    curves = [figure6(cells, methods, fractions, t, out / f"figure6_{t}.png") for t in spec.get("fraction_tasks", [])]
    wall = sum(json.loads(p.read_text())["wall_s"] for p in (out / "cells").glob("*.json"))
    results = {"config": str(args.config), "data": data_info, "seen": spec["data"]["seen"],
               "unseen": spec["data"]["unseen"], "methods": methods, "tasks": tasks, "figure6": curves,
               "cells": [c for c in cells.values()], "cells_wall_s": round(wall, 1),
               "this_invocation_wall_s": round(time.perf_counter() - t0, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(open(out / "table3.md").read())
    print(f"cells wall time {wall:.0f} s (this invocation {results['this_invocation_wall_s']:.0f} s); {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
