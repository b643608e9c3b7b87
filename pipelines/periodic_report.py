"""Evaluation and report of the periodic-sampling experiment (``periodic_sampling_experiment.py``): AUC per
segment column, paired ΔAUC against reference models, their spread over training seeds, and the Markdown
report with a reading of the paper's orderings."""
from __future__ import annotations

import numpy as np

from experiment_tools import delta_spread, over_seeds, spread


# ------------------------------------------------------------------------------------------ evaluation
def evaluate(raw: dict, n_boot: int, seed: int) -> dict:
    """AUC [95 % CI] of one model per column ("val:<segment>", "val:pooled", "test:<segment>")."""
    from mammodg.metrics.classification import classification_report

    out = {}
    for split, (p, y, segs) in raw.items():
        rep = classification_report(y, p, segs, n_boot=n_boot, seed=seed, max_roc_points=50)
        groups = dict(rep["segments"]) | ({"pooled": rep["global"]} if split == "val" else {})
        for name, g in groups.items():
            out[f"{split}:{name}"] = {k: g.get(k) for k in ("auc", "auc_ci", "n_pos", "n_neg")}
    return out


def paired_deltas(raw: dict, refs, n_boot: int, seed: int) -> dict:
    """{reference: {model: {column: bootstrap_delta_auc(reference -> model)}}}: positive = model better."""
    from mammodg.metrics.classification import bootstrap_delta_auc

    out: dict = {}
    for ref in [r for r in refs if r in raw]:
        for model in [m for m in raw if m != ref]:
            per_col = out.setdefault(ref, {}).setdefault(model, {})
            for split in ("val", "test"):
                pa, ya, sa = raw[ref][split]
                pb, yb, sb = raw[model][split]
                if not (np.array_equal(ya, yb) and np.array_equal(sa, sb)):
                    raise RuntimeError(f"{split}: evaluation order differs between runs; cannot pair")
                groups = {f"{split}:{s}": sa == s for s in np.unique(sa)}
                if split == "val":
                    groups["val:pooled"] = np.ones(ya.shape, bool)
                for key, m in groups.items():
                    d = bootstrap_delta_auc(ya[m], pa[m], pb[m], n_boot=n_boot, seed=seed)
                    per_col[key] = {k: d[k] for k in ("delta", "ci_low", "ci_high", "p_value", "auc_a", "auc_b")}
    return out


def aggregate(per_seed: dict) -> dict:
    """Mean, std, min-max over seeds of every AUC and ΔAUC, and the seeds with a significant ΔAUC per sign."""
    seeds = list(per_seed.values())
    return {"auc": over_seeds([{m: {c: g["auc"] for c, g in r["auc"].items()} for m, r in s["models"].items()}
                               for s in seeds], spread, 2),
            "delta": over_seeds([s["delta"] for s in seeds], delta_spread, 3)}


# ------------------------------------------------------------------------------------------ reporting
def _md(name: str) -> str:
    """A name made safe for a Markdown table cell ("val:S1|VendorA" -> "val:S1/VendorA")."""
    return str(name).replace("|", "/")


def _col_name(col: str) -> str:
    split, seg = col.split(":", 1)
    return "val, pooled S1+S2" if seg == "pooled" else f"{_md(seg)} ({'held-out test' if split == 'test' else 'val'})"


def _fmt_spread(s: dict | None, signs: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    f = "+.3f" if signs else ".3f"
    txt = f"{s['mean']:{f}} ± {s['std']:.3f} ({s['min']:{f}}..{s['max']:{f}})"
    if "n_sig_pos" in s:
        txt += f"; sig +{s['n_sig_pos']}/−{s['n_sig_neg']} of {s['n']}"
    return txt


def _fmt_auc(g: dict | None) -> str:
    if not g or g.get("auc") is None:
        return "n/a"
    return f"{g['auc']:.3f} [{g['auc_ci'][0]:.3f}, {g['auc_ci'][1]:.3f}]"


def _fmt_delta(d: dict | None) -> str:
    if not d or d.get("delta") is None or not np.isfinite(d["delta"]):
        return "n/a"
    return f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p={d['p_value']:.3f}"


def narrative(results: dict) -> list[str]:
    """The paper's orderings checked against the means and the per-seed significant ΔAUCs."""
    names, agg, cols = results["names"], results["aggregate"], results["columns"]
    n = len(results["seeds"])
    lines = []
    focus = [c for c in cols if c.startswith("test:")] + [results["rare_column"]]
    for col in focus:
        means = {m: a[col]["mean"] for m, a in agg["auc"].items() if a.get(col, {}).get("mean") is not None}
        if "periodic" not in means:
            continue
        order = sorted(means, key=means.get, reverse=True)
        ranking = " > ".join(f"{names[m]} {means[m]:.3f}" for m in order)
        vs = []
        for ref in ("balanced_labels", "baseline"):
            d = agg["delta"].get(ref, {}).get("periodic", {}).get(col)
            if d and d.get("mean") is not None:
                vs.append(f"vs {names[ref]} ΔAUC {_fmt_spread(d, True)}")
        holds = all(means["periodic"] >= v for v in means.values())
        lines.append(f"**{_col_name(col)}** (mean AUC over {n} seeds): {ranking}. Periodic "
                     + ("is at or above every other model on the mean" if holds else "is not the best on the mean")
                     + (" (" + "; ".join(vs) + ")" if vs else "") + ".")
    for m in ("balanced_labels", "balanced_segments"):
        parts = []
        for col in focus:
            d = agg["delta"].get("baseline", {}).get(m, {}).get(col)
            if d and d.get("mean") is not None:
                parts.append(f"{_col_name(col)} {_fmt_spread(d, True)}")
        if parts:
            lines.append(f"{names[m]} vs {names['baseline']}: " + "; ".join(parts) + ".")
    for m, per in agg["auc"].items():  # the paper's warning sign: pooled val AUC above every per-segment val AUC
        inflated = sum(1 for s in results["seeds"].values() if _pooled_inflated(s["models"][m]["auc"]))
        if inflated:
            lines.append(f"{names[m]}: pooled val AUC above every per-segment val AUC (+0.02) in {inflated} of {n} "
                         "seeds (the paper's Fig. 3/4 warning sign: a score offset between segments).")
    lines.append("Caveats: one data draw and one patch backbone for every seed (the spread is training-seed "
                 "variation only); synthetic phantoms whose vendor styles differ more cleanly than real devices; tiny "
                 "models and few steps on CPU; the kept checkpoint is chosen on the (pooled) val WLL, so the val "
                 "columns are slightly optimistic; S2's val set has few positives by design, so its CIs are wide.")
    return lines


def _pooled_inflated(auc: dict) -> bool:
    per = [g["auc"] for c, g in auc.items() if c.startswith("val:") and c != "val:pooled" and g["auc"] is not None]
    pooled = auc.get("val:pooled", {}).get("auc")
    return bool(per) and pooled is not None and pooled > max(per) + 0.02


def markdown(results: dict) -> str:
    names, cols, agg = results["names"], results["columns"], results["aggregate"]
    seeds = results["seeds"]
    out = ["# Periodic sampling, in silico (phantoms)", "",
           f"Training seeds {list(seeds)}; one data draw (phantoms, records and split: data seed "
           f"{results['args']['data_seed']}); one patch-stage backbone (data seed) shared by every seed and model. "
           f"Baseline = the paper's baseline (1): trained and validated on {results['baseline_segments']} only, "
           "balanced labels.", "", "## Segments (Table 1 shape)", "",
           "| segment | style | role | patients | benign img | malignant img | p_mal |", "|---|---|---|---|---|---|---|"]
    for s, d in results["segments"].items():
        out.append(f"| {s} | {d['style']} | {d['role']} | {d['patients_kept']} | {d['benign_images']} | "
                   f"{d['malignant_images']} | {d['p_mal']:.3f} |")
    out += ["", "Training split (images), from dataset.json: " + "; ".join(
        f"{_md(k)}: {v['0']}-/{v['1']}+" for k, v in results["train_counts"].items()), ""]
    shares = results["sampling_shares"]
    keys = list(dict.fromkeys(k for sh in shares.values() for k in sh))
    out += ["## Share of each segment/label in the training batches", "",
            "| model | " + " | ".join(_md(k) for k in keys) + " |", "|---|" + "---|" * len(keys)]
    out += [f"| {names[m]} | " + " | ".join(f"{sh.get(k, 0.0):.3f}" for k in keys) + " |" for m, sh in shares.items()]
    any_seed = next(iter(seeds.values()))["models"]
    n_of = {c: next(g for r in any_seed.values() for cc, g in r["auc"].items() if cc == c) for c in cols}
    head = " | ".join(f"{_col_name(c)}<br>n={n_of[c]['n_pos']}+/{n_of[c]['n_neg']}-" for c in cols)
    out += ["", f"## AUC over {len(seeds)} seeds: mean ± std (min..max)", "", f"| model | {head} |",
            "|---|" + "---|" * len(cols)]
    out += [f"| {names[m]} | " + " | ".join(_fmt_spread(a.get(c)) for c in cols) + " |" for m, a in agg["auc"].items()]
    for ref, per in agg["delta"].items():
        out += ["", f"## ΔAUC = AUC(model) - AUC({names[ref]}): mean ± std (min..max); seeds with p < 0.05 by sign",
                "", "| model | " + " | ".join(_md(c) for c in cols) + " |", "|---|" + "---|" * len(cols)]
        out += [f"| {names[m]} | " + " | ".join(_fmt_spread(pc.get(c), True) for c in cols) + " |"
                for m, pc in per.items()]
    out += ["", "## Per seed: AUC [95 % bootstrap CI]", "", "| seed | model | " + " | ".join(_md(c) for c in cols)
            + " | best step |", "|---|---|" + "---|" * (len(cols) + 1)]
    for k, s in seeds.items():
        out += [f"| {k} | {names[m]} | " + " | ".join(_fmt_auc(r["auc"].get(c)) for c in cols) + f" | {r['best_step']} |"
                for m, r in s["models"].items()]
    out += ["", "## Per seed: paired ΔAUC [95 % CI], bootstrap p", "",
            "| reference | model | seed | " + " | ".join(_md(c) for c in cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for ref in agg["delta"]:
        for m in agg["delta"][ref]:
            out += [f"| {names[ref]} | {names[m]} | {k} | " + " | ".join(_fmt_delta(s["delta"][ref][m].get(c)) for c in cols)
                    + " |" for k, s in seeds.items() if m in s["delta"].get(ref, {})]
    out += ["", "## Reading", ""] + [f"- {line}" for line in results["narrative"]]
    a, t = results["args"], results["timing"]
    out += ["", f"Scale: {a['height']}x{a['width_px']} images, backbone filters {a['filters']} x width {a['width']}, "
            f"batch {a['batch_size']}, patch stage {a['patch_steps']} steps on {a['patch_size']} px crops (once), "
            f"classifier {a['steps']} steps per model and seed (lr {a['lr']}), {a['n_boot']} bootstraps. Wall time: "
            f"{t['total_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in t.items() if k != 'total_s')}).", ""]
    return "\n".join(out)


def to_json(o):
    """JSON-safe: numpy scalars to Python, non-finite floats to None, tuples to lists, keys to str."""
    if isinstance(o, dict):
        return {str(k): to_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_json(v) for v in o]
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o
