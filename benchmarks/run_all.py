#!/usr/bin/env python
"""``make bench``: every benchmark script as a subprocess, sized for about 15 minutes on 2 CPU cores, gathered
into ``benchmarks/results.json`` and a Markdown table ``benchmarks/RESULTS.md``.

    python benchmarks/run_all.py [--only models,pipeline] [--models-python /path/to/python] [--models-backend jax]

Each script writes its own JSON under ``benchmarks/results/`` (its log beside it, in ``logs/``); a script that
fails or runs past its timeout is recorded with its exit status and the tail of its log, and the others still
run. Every figure goes out with the machine (CPU model, cores, memory, GPU), the versions, the date and the load
average, and beside it the published reference or target and the limit where one applies (see REFERENCES).
The model benchmarks can run with another interpreter and Keras backend (``--models-python`` of a venv with
jax, ``--models-backend jax``): the pipeline benchmarks always use TensorFlow.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"

# The contrastive pipeline at the ResNet-50 benchmark's input (models.py: 224, 8 images a step): the demo's pair
# records, the MSVCL method (4 views), 2 samples a step, the MSVCL config's crop scales and projection head.
CONTRASTIVE_224 = ("contrastive.input_size=[224, 224]", "batch_size=2", "contrastive.crop_scale=[0.6, 1.0]",
                   "contrastive.view_crop_scale=[0.6, 1.0]", "contrastive.hidden_dim=2048", "contrastive.projection_dim=128")

# name: (script, arguments sized for the 2-core budget, timeout s, the JSON it writes)
SUITE = {
    "sampling_pattern": ("sampling_pattern.py", [], 180, "sampling_pattern.json"),
    "record_size": ("record_size.py", ["--out", str(RESULTS / "record_size.json")], 180, "record_size.json"),
    "build_tfrecords": ("build_tfrecords.py", ["--copies", "1", "--out", str(RESULTS)], 300, "build_tfrecords.json"),
    "build_beam": ("build_beam.py", ["--copies", "1", "--out", str(RESULTS / "build_beam.json")], 300, "build_beam.json"),
    "pipeline": ("pipeline.py", ["--records", "256", "--distinct", "4", "--repeats", "5", "--batches", "32",
                                 "--out", str(RESULTS)], 300, "pipeline.json"),
    "contrastive_pipeline": ("contrastive_pipeline.py", ["--steps", "4", "--warmup", "2", "--repeats", "3", "--case",
                                                         "224 input:" + ";".join(CONTRASTIVE_224),
                                                         "--out", str(RESULTS / "contrastive_pipeline.json")],
                             480, "contrastive_pipeline.json"),
    "detection_pipeline": ("detection_pipeline.py", ["--steps", "4", "--warmup", "2", "--repeats", "2",
                                                     "--out", str(RESULTS / "detection_pipeline.json")],
                           300, "detection_pipeline.json"),
    "models": ("models.py", ["--steps", "5", "--out", str(RESULTS / "models.json")], 600, "models.json"),
}

# Published figures (labelled as such in the table). GPU peaks: NVIDIA A100 and V100 datasheets (dense tensor-core
# FP16/BF16 with FP32 accumulate); ResNet-50 rates: NVIDIA DeepLearningExamples, TF ResNet-50 v1.5, AMP + XLA.
REFERENCES = {
    "resnet50_a100_img_s": 2375, "resnet50_v100_img_s": 1270, "resnet50_train_gflop_per_img": 24.5,
    "a100_peak_tflop_s": 312, "v100_peak_tflop_s": 125,
    "sampling_pattern_target_s": 0.5, "sampling_pattern_limit_s": 0.05,
    "pipeline_ratio_target": 0.9, "memory_ratio_target": 1.2,
}

# Cost at scale: dataset sizes of the two papers, GPU counts, and each stage's paper config (its steps were set for
# the dataset of its paper: periodic sampling ~250,000 images, MSVCL v2 ~29,700; CycleGAN trains on 1,000 images
# per style whatever the dataset size).
DATASETS = (29_700, 250_000)
GPUS = (1, 8, 64)
BEAM_WORKERS = (16, 64)
STAGES = (  # stage, config, (model, key) in models.json: training GFLOP/img (a *train* key) or forward GFLOP/img (3x);
    # ("stage_flops", stage): the forward count of models.py's stage_flops; views (images a sample); paper N
    ("patch (VGG backbone, 224 patches)", "configs/periodic_sampling/patch.yaml", ("vgg_classifier", "patch_224_forward_gflop_per_img"), 1, 250_000),
    ("classifier (VGG, 1152x832)", "configs/periodic_sampling/classifier.yaml", ("vgg_classifier", "paper_train_gflop_per_img"), 1, 250_000),
    ("cyclegan (per style pair, 512 crops)", "configs/msvcl/cyclegan.yaml", ("cyclegan", "paper_train_gflop_per_img"), 1, None),
    ("contrastive (ResNet-50, 512x384, MSVCL 3 views)", "configs/msvcl/contrastive.yaml", ("resnet50_contrastive", "msvcl_512x384_forward_gflop_per_img"), 3, 29_700),
    ("detection (FCOS, ResNet-50, 1152x832)", "configs/msvcl/detection.yaml", ("stage_flops", "detection"), 1, 29_700),
    ("birads (ResNet-50, 224 crops)", "configs/msvcl/birads.yaml", ("stage_flops", "birads"), 1, 29_700),
    ("density (ResNet-50, 224x224)", "configs/msvcl/density.yaml", ("stage_flops", "density"), 1, 29_700),
    ("matching (ResNet-50 siamese, 2 ROIs of 224)", "configs/msvcl/matching.yaml", ("stage_flops", "matching"), 2, 29_700),
)


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "mhz": None,
            "memory_gib": None, "gpu": None, "platform": platform.platform()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and info["cpu"] in ("", "x86_64", platform.machine()):
                info["cpu"] = val.strip()
            if key.strip() == "cpu MHz" and info["mhz"] is None:
                info["mhz"] = float(val)
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["gpu"] = out.stdout.strip() or None
    if info["mhz"]:  # assumed: 2 FMA pipes x FP32 lanes (16 with AVX-512, 8 with AVX2) x 2 FLOP per FMA
        flags = cpuinfo.split("flags", 1)[-1].split("\n", 1)[0].split()
        per_cycle = 2 * (16 if "avx512f" in flags else 8) * 2
        info["nominal_peak_gflop_s"] = round(info["cores"] * info["mhz"] / 1e3 * per_cycle, 1)
        info["nominal_peak_note"] = f"cores x MHz x {per_cycle} FP32 FLOP/cycle (2 FMA pipes, assumed)"
    return info


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "numpy", "jax", "apache-beam"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def run_one(name: str, python: str, env: dict, extra: list[str]) -> dict:
    script, args, timeout, json_name = SUITE[name]
    out_json = RESULTS / json_name
    out_json.unlink(missing_ok=True)  # never report a previous run's figures
    log = RESULTS / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(BENCH / script), *args, *extra]
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    rec = {"command": " ".join([script, *args, *extra]), "rc": rc,
           "wall_s": round(time.perf_counter() - t, 1), "log": str(log.relative_to(ROOT)),
           "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    if rc == 0 and out_json.is_file():
        rec["result"] = json.loads(out_json.read_text())
    else:
        rec["error"] = f"exit status {rc}" if out_json.is_file() or rc != 0 else "no result file written"
        rec["log_tail"] = log.read_text(errors="replace")[-1500:]
    print(f"{name}: rc {rc}, {rec['wall_s']} s", flush=True)
    return rec


# --- Markdown ---

def _f(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def rows(res: dict, mach: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, reference or target, limit) for every figure present."""
    out, R = [], REFERENCES
    b = res.get("benchmarks", {})
    sp = b.get("sampling_pattern", {}).get("result")
    if sp:
        limit = f"{_f(sp['write_40MB_s'])} s (writing 40 MB, measured)" if "write_40MB_s" in sp \
            else f"~{R['sampling_pattern_limit_s']} s (writing 40 MB)"
        out.append(("Sampling pattern, 10M slots / 1,000 segments (s)", _f(sp["fast_10M_slots_1000_segments_s"]),
                    f"target < {R['sampling_pattern_target_s']} s", limit))
        out.append(("Sampling pattern, slot-by-slot reference, 100k slots (s)", _f(sp["reference_100k_slots_s"]), "", ""))
    bt = b.get("build_tfrecords", {}).get("result")
    if bt:
        n, bare = bt["cpu_count"], bt["bare_loop_img_s"]
        out.append((f"TFRecord build, bare decode + PNG loop, 1 core, {bt['images']} manifest rows (img/s)", _f(bare), "", ""))
        for w in sorted({1, n}):
            out.append((f"TFRecord build, local, {w} worker(s) (img/s)", _f(bt[f"build_{w}w_img_s"]),
                        f"bare loop x {w}: {_f(bare * w)} (it encodes the full-size image)", ""))
    bb = b.get("build_beam", {}).get("result")
    if bb and "skipped" in bb:
        out.append(("TFRecord build on Beam", bb["skipped"], "", ""))
    elif bb:
        for w in sorted({1, bb["cpu_count"]}):
            out.append((f"TFRecord build on Beam (embedded FnApiRunner), {w} worker(s), {bb['images']} images (img/s)",
                        _f(bb[f"beam_{w}w_img_s"]), f"local, same images, just before: {_f(bb[f'local_{w}w_img_s'])}", ""))
    rs = b.get("record_size", {}).get("result")
    if rs:
        out.append(("TFRecord build, bytes per record (real mammograms, 1152x832 16-bit PNG)",
                    f"{rs['bytes_per_record'] / 1024:,.0f} KiB", "", ""))
    pl = b.get("pipeline", {}).get("result")
    if pl and "throughput" in pl:
        a = pl["throughput"]
        out.append((f"Input pipeline, periodic, {a['segments']} segments (img/s)", _f(a["periodic_img_s"]), "", ""))
        out.append(("Input pipeline, plain interleaved reader (img/s)", _f(a["plain_img_s"]), "", ""))
        out.append((f"Input pipeline, periodic / plain{_spread(a.get('ratio_runs', []))}", _f(a["ratio"]),
                    f"target >= {R['pipeline_ratio_target']}", ""))
        out.append(("Input pipeline, CPU ms per image, periodic / plain (plain / periodic: the ratio when CPU-bound)",
                    f"{_f(a['periodic_cpu_ms_per_img'])} / {_f(a['plain_cpu_ms_per_img'])} ({_f(a['cpu_efficiency_ratio'])})",
                    "", ""))
    if pl and "memory" in pl:
        m = pl["memory"]
        for k in sorted((k for k in m if k.isdigit()), key=int):
            out.append((f"Input pipeline, peak RSS, {k} segments (MB)", _f(m[k]["peak_rss_mb"], 4), "", ""))
        out.append(("Input pipeline, peak RSS ratio (most / fewest segments)", _f(m["ratio"]),
                    f"target <= {R['memory_ratio_target']}", ""))
    cp = b.get("contrastive_pipeline", {}).get("result")
    if cp:
        out += contrastive_rows("demo config", cp)
        for label, case in cp.get("cases", {}).items():
            out += contrastive_rows(label, case)
    dp = b.get("detection_pipeline", {}).get("result")
    if dp:
        for k in ("pipeline", "memory"):
            out.append((f"Detection training, demo config, {k} (img/s)", _f(dp["images_per_s"][k]), "", ""))
        out.append(("Detection training, pipeline / in-memory", _f(dp["ratio_pipeline_over_memory"]),
                    f"target >= {R['pipeline_ratio_target']}", ""))
    mo = b.get("models", {}).get("result")
    if mo:
        out += model_rows(mo, mach)
    return out


def _spread(runs: list[float]) -> str:
    """" (median of N paired runs, a-b)" for several runs of a ratio."""
    return f" (median of {len(runs)} paired runs, {min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""


def contrastive_rows(label: str, cp: dict) -> list[tuple[str, str, str, str]]:
    """The ResNet-50 encoder trained from the contrastive stage's pipeline and from memory, and the pipeline alone."""
    what = f"Contrastive training, ResNet-50, {label} ({cp['views_per_sample']} views at {'x'.join(map(str, cp['input_size']))})"
    img = cp["images_per_s"]
    out = [(f"{what}, from the real pipeline (img/s)", _f(img["pipeline"]), f"in-memory {_f(img['memory'])}", ""),
           (f"{what}, pipeline / in-memory{_spread(cp.get('ratio_runs', []))}", _f(cp["ratio_pipeline_over_memory"]),
            f"target >= {REFERENCES['pipeline_ratio_target']}", "")]
    if "pipeline_alone" in img:
        out.append((f"{what}, the pipeline alone, no model (img/s)", _f(img["pipeline_alone"]),
                    f"{img['pipeline_alone'] / img['memory']:.1f}x the in-memory training rate", ""))
    if "cpu_ms_per_sample" in cp:
        c = cp["cpu_ms_per_sample"]
        out.append((f"{what}, CPU ms per sample: pipeline / in-memory (in-memory / pipeline: the ratio when CPU-bound)",
                    f"{_f(c['pipeline'])} / {_f(c['memory'])} ({_f(cp['cpu_ratio_memory_over_pipeline'])})", "", ""))
    return out


def resnet50_gflop(mo: dict) -> float:
    """Training GFLOP of ResNet-50 at 224 counted like the other models (the published 24.5 if not measured), so
    scaling NVIDIA's ResNet-50 rate by a FLOP ratio compares counts made the same way."""
    r = mo["models"].get("resnet50_contrastive", {})
    return r.get("paper_train_gflop_per_img") or REFERENCES["resnet50_train_gflop_per_img"]


def model_rows(mo: dict, mach: dict) -> list[tuple[str, str, str, str]]:
    out, R = [], REFERENCES
    peak = mach.get("nominal_peak_gflop_s")
    backend = mo["versions"].get("backend")
    ref_gf = resnet50_gflop(mo)
    for name, r in mo["models"].items():
        if "skipped" in r or "error" in r:
            out.append((f"{name}: training", r.get("skipped") or f"failed: {r['error'][:120]}", "", ""))
            continue
        size = "x".join(map(str, r["measured_size"]))
        paper = "x".join(map(str, r["paper_size"]))
        gf = r.get("paper_train_gflop_per_img") or r.get("train_gflop_per_img")
        ref = f"A100 ~{_f(R['resnet50_a100_img_s'] * ref_gf / gf)} (2,375 x {_f(ref_gf)} / {_f(gf)}, an estimate)"
        if name == "resnet50_contrastive":
            ref = f"{R['resnet50_a100_img_s']:,} A100 / {R['resnet50_v100_img_s']:,} V100 (NVIDIA, AMP+XLA)"
        limit = f"A100 {_f(R['a100_peak_tflop_s'] * 1e3 / gf)} at {R['a100_peak_tflop_s']} TFLOP/s"
        what = f"{name} at {size}" + (f" (width {r['width']})" if r.get("width", 1.0) != 1.0 else "")
        cpu_limit = f"; this CPU {_f(peak / r['train_gflop_per_img'])} at {peak} GFLOP/s" if peak else ""
        if name == "cyclegan":
            what += " (image pairs/s of a CycleGAN step = 6 G + 6 D passes, from the G and D rates)"
            out.append((f"cyclegan generator / discriminator forward+backward at {size} (img/s)",
                        f"{_f(r['generator']['img_s'])} / {_f(r['discriminator']['img_s'])}", "", ""))
        out.append((f"{what}, in-memory, {backend} (img/s)", _f(r["memory_img_s"]), "", f"{cpu_limit[2:]}"))
        out.append((f"{name}: training GFLOP/img at {size}; achieved GFLOP/s",
                    f"{_f(r['train_gflop_per_img'])}; {_f(r['achieved_gflop_s'])}",
                    "ResNet-50 at 224: 24.5 (3-channel)" if name == "resnet50_contrastive" else "",
                    f"{peak} GFLOP/s (nominal)" if peak else ""))
        if r.get("paper_img_s_extrapolated") is not None:
            out.append((f"{name} at {paper}, in-memory (img/s, extrapolated by FLOP ratio; {_f(gf)} GFLOP/img)",
                        _f(r["paper_img_s_extrapolated"]), ref, limit))
        else:
            out.append((f"{name} at {paper}: reference and limit ({_f(gf)} GFLOP/img)", "", ref, limit))
        pipe = r.get("pipeline", {})
        if "img_s" in pipe and name == "cyclegan":  # the stage's own train step: its pipeline vs its batch in memory
            out.append((f"cyclegan stage train step at {size}, from the real pipeline ({pipe['strategy']}) "
                        f"(image pairs/s)", _f(pipe["img_s"]), f"in-memory (same step) {_f(pipe['memory_img_s'])}", ""))
            out.append((f"cyclegan stage train step at {paper}, from the real pipeline (image pairs/s, extrapolated by "
                        "FLOP ratio)", _f(pipe["paper_img_s_extrapolated"]),
                        f"in-memory (same step) {_f(pipe['paper_memory_img_s_extrapolated'])}", limit))
        elif "img_s" in pipe:
            out.append((f"{name} at {size}, from the real pipeline ({pipe['strategy']}) (img/s)", _f(pipe["img_s"]),
                        f"in-memory {_f(r['memory_img_s'])}", ""))
    return out


def _row(cells: list[str], n: int) -> str:
    """A Markdown table row of ``n`` columns (missing cells empty)."""
    return "| " + " | ".join(cells + [""] * (n - len(cells))) + " |"


def _hours(seconds: float) -> str:
    return "< 1 min" if seconds < 60 else f"{seconds / 60:,.0f} min" if seconds < 3600 else f"{seconds / 3600:,.1f} h" if seconds < 86400 * 2 \
        else f"{seconds / 86400:,.1f} days"


def cost_at_scale(res: dict) -> list[str]:
    """Markdown: build time and size, and training time per stage on N GPUs, for DATASETS (estimates)."""
    import yaml

    b, R = res["benchmarks"], REFERENCES
    bt, rs = b.get("build_tfrecords", {}).get("result"), b.get("record_size", {}).get("result")
    mo = b.get("models", {}).get("result")
    out = ["", "## Cost at scale (estimates from the figures above)", ""]
    if bt and rs:
        n, r1, rn = bt["cpu_count"], bt["build_1w_img_s"], bt[f"build_{bt['cpu_count']}w_img_s"]
        best_w, best = max(((1, r1), (n, rn)), key=lambda t: t[1])
        bb = b.get("build_beam", {}).get("result") or {}
        per_worker, basis = (bb["beam_1w_img_s"], "the measured 1-worker Beam rate") if "beam_1w_img_s" in bb \
            else (r1, "the measured 1-worker local rate (Beam not measured)")
        out += [f"Build: measured {_f(r1)} img/s with 1 worker and {_f(rn)} with {n} on this machine (real 4.5k x 2.8k "
                f"CBIS-DDSM DICOMs, load average {res['load_avg_start'][0]}), {rs['bytes_per_record'] / 1024:,.0f} KiB "
                "per record. 'This machine' uses the better of the two; the Beam columns are an extrapolation: W "
                f"one-core workers at {basis} ({_f(per_worker)} img/s), linear scaling, no shuffle or I/O limit.",
                "", f"| images | size | this machine ({best_w} worker{'s' * (best_w > 1)}) | "
                + " | ".join(f"Beam, {w} workers" for w in BEAM_WORKERS)
                + " |", "|---" * (3 + len(BEAM_WORKERS)) + "|"]
        for N in DATASETS:
            out.append(f"| {N:,} | {N * rs['bytes_per_record'] / 2**30:,.1f} GiB | {_hours(N / best)} | "
                       + " | ".join(_hours(N / (w * per_worker)) for w in BEAM_WORKERS) + " |")
    if mo:
        out += ["", "Training: images seen = steps x batch x views of each stage's paper config; GPU rate = NVIDIA's "
                f"{R['resnet50_a100_img_s']:,} img/s for ResNet-50 on one A100 (AMP + XLA) scaled by the FLOP ratio "
                f"({_f(resnet50_gflop(mo))}, ResNet-50 at 224 counted the same way, / the stage's training GFLOP per image), "
                "i.e. the same "
                "fraction of peak; linear scaling over GPUs. Steps were set for the paper's dataset: for the other "
                "size they are scaled to keep the epochs (CycleGAN: fixed, it trains on 1,000 images per style). Linear "
                "scaling over 8 or 64 GPUs ignores communication and input limits: a lower bound on time.", "",
                "| stage | GFLOP/img | A100 img/s (est.) | images | " + " | ".join(
                    f"{N:,} images, {g} GPU{'s' * (g > 1)}" for N in DATASETS for g in GPUS) + " |",
                "|---" * (4 + len(DATASETS) * len(GPUS)) + "|"]
        for stage, config, (model, key), views, paper_n in STAGES:
            gf = (mo.get("stage_flops", {}).get(key, {}).get("forward_gflop_per_img") if model == "stage_flops"
                  else mo["models"].get(model, {}).get(key))
            if gf is None:
                out.append(_row([stage, f"n/a ({key if model == 'stage_flops' else model} not measured)"],
                                4 + len(DATASETS) * len(GPUS)))
                continue
            gf = gf if key.endswith("train_gflop_per_img") else 3 * gf
            cfg = yaml.safe_load((ROOT / config).read_text())
            seen = cfg["steps"] * cfg["batch_size"] * views
            rate = R["resnet50_a100_img_s"] * resnet50_gflop(mo) / gf
            cells = [_hours(seen * (N / paper_n if paper_n else 1) / (g * rate)) for N in DATASETS for g in GPUS]
            out.append(f"| {stage} | {_f(gf)} | {_f(rate)} | {seen:,} ({cfg['steps']:,} x {cfg['batch_size']}"
                       f"{f' x {views}' if views > 1 else ''}) | " + " | ".join(cells) + " |")
    return out


def markdown(res: dict) -> str:
    m, v = res["machine"], res["versions"]
    lines = [
        "# Benchmark results (`make bench`)", "",
        f"Run {res['date']} at commit {res['commit']}, total {res['wall_s']} s. "
        f"Machine: {m['cpu']}, {m['cores']} cores at {m['mhz']} MHz, {m['memory_gib']} GiB, GPU: {m['gpu'] or 'none'}. "
        f"Load average at start {res['load_avg_start']}, at end {res['load_avg_end']} (a shared machine: "
        "rates are pessimistic). Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        "",
        "| figure | measured | published reference / target | limit |",
        "|---|---|---|---|",
    ]
    lines += [_row(list(r), 4) for r in rows(res, m)]
    failed = [f"{k} ({b.get('error')})" for k, b in res["benchmarks"].items() if "error" in b]
    lines += ["", "Failed or skipped benchmarks: " + (", ".join(failed) if failed else "none") + ".", "",
              "Limits: GPU peaks are the NVIDIA datasheets' dense FP16/BF16 tensor-core figures; the CPU peak is "
              f"nominal ({m.get('nominal_peak_note', 'n/a')}). Training FLOPs are 3x the counted forward FLOPs. "
              "Sizes measured below the paper's (to fit the 2-core budget) are extrapolated by FLOP ratio at the "
              "measured GFLOP/s, and say so. Per-script JSON and logs: `benchmarks/results/`; all figures: "
              "`benchmarks/results.json`."]
    lines += cost_at_scale(res)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SUITE)}")
    ap.add_argument("--models-python", default=sys.executable, help="interpreter for models.py (e.g. a jax venv)")
    ap.add_argument("--models-backend", default="", help="KERAS_BACKEND for models.py (default: the environment's)")
    ap.add_argument("--json", default=str(BENCH / "results.json"))
    ap.add_argument("--markdown", default=str(BENCH / "RESULTS.md"))
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from an existing --json")
    args = ap.parse_args()
    if args.render:
        Path(args.markdown).write_text(markdown(json.loads(Path(args.json).read_text())))
        return 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    chosen = [n for n in args.only.split(",") if n] or list(SUITE)
    unknown = set(chosen) - set(SUITE)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {', '.join(SUITE)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
           "machine": machine(), "versions": versions(), "references": REFERENCES,
           "load_avg_start": [round(x, 2) for x in os.getloadavg()], "benchmarks": {}}
    t = time.perf_counter()
    for name in chosen:
        python, run_env = sys.executable, dict(env, KERAS_BACKEND="tensorflow")
        if name == "models":
            python = args.models_python
            run_env = dict(env, KERAS_BACKEND=args.models_backend or os.environ.get("KERAS_BACKEND", "tensorflow"))
        res["benchmarks"][name] = run_one(name, python, run_env, [])
    res["wall_s"] = round(time.perf_counter() - t, 1)
    res["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.json).write_text(json.dumps(res, indent=1, default=float))
    Path(args.markdown).write_text(markdown(res))
    print(f"wrote {args.json} and {args.markdown} in {res['wall_s']} s")
    return 0 if all("error" not in b for b in res["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
