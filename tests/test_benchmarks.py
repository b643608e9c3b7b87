"""The benchmark suite's own arithmetic: FLOP counts against hand counts, a failing script recorded while the
others run, and the cost-at-scale table against figures worked out by hand."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import models as bm  # noqa: E402
import run_all  # noqa: E402


def test_forward_flops_match_hand_counts():
    import keras

    x = keras.Input((8, 8, 3))
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(x)  # 8*8*4 outputs x 3*3*3 MACs
    z = keras.layers.Dense(5, use_bias=False)(keras.layers.Flatten()(y))  # 256 x 5 MACs
    model = keras.Model(x, z)
    flops = bm.forward_flops(model, np.zeros((1, 8, 8, 3), np.float32))
    assert flops == 2 * (8 * 8 * 4 * 27 + 256 * 5)


def test_derive_extrapolates_by_flop_ratio():
    res = bm.derive({"forward_gflop_per_img": 2.0, "paper_forward_gflop_per_img": 8.0, "memory_img_s": 10.0})
    assert res["train_gflop_per_img"] == 6.0 and res["achieved_gflop_s"] == 60.0
    assert res["paper_train_gflop_per_img"] == 24.0 and res["paper_img_s_extrapolated"] == 2.5


def test_a_failing_benchmark_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bad.py").write_text("raise SystemExit('boom')\n")
    (bench / "good.py").write_text(f"import json; open({str(tmp_path / 'r' / 'good.json')!r}, 'w').write(json.dumps({{'x': 1}}))\n")
    monkeypatch.setattr(run_all, "ROOT", tmp_path)
    monkeypatch.setattr(run_all, "BENCH", bench)
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "r")
    (tmp_path / "r").mkdir()
    monkeypatch.setattr(run_all, "SUITE", {"bad": ("bad.py", [], 30, "bad.json"), "good": ("good.py", [], 30, "good.json")})
    bad = run_all.run_one("bad", sys.executable, {}, [])
    good = run_all.run_one("good", sys.executable, {}, [])
    assert bad["rc"] == 1 and "boom" in bad["log_tail"] and "result" not in bad
    assert good["rc"] == 0 and good["result"] == {"x": 1}


def test_cost_at_scale_against_hand_figures():
    mo = {"versions": {"backend": "tensorflow"}, "models": {
        "resnet50_contrastive": {"paper_train_gflop_per_img": 24.5, "msvcl_512x384_forward_gflop_per_img": 24.5},
        "vgg_classifier": {"paper_train_gflop_per_img": 245.0, "patch_224_forward_gflop_per_img": 1.0},
        "cyclegan": {"paper_train_gflop_per_img": 2375 * 24.5 / 10}},
        "stage_flops": {"detection": {"forward_gflop_per_img": 49.0}, "matching": {"forward_gflop_per_img": 49.0},
                        "birads": {"error": "ValueError: x"}}}
    res = {"load_avg_start": [1.0], "benchmarks": {
        "build_tfrecords": {"result": {"cpu_count": 2, "build_1w_img_s": 1.0, "build_2w_img_s": 2.0}},
        "record_size": {"result": {"bytes_per_record": 2**30 / 29_700}},
        "models": {"result": mo}}}
    text = "\n".join(run_all.cost_at_scale(res))
    # 29,700 records of 1/29,700 GiB: 1.0 GiB; 29,700 / 2 img/s = 4.1 h; 16 one-core workers at 1 img/s: 31 min
    assert "| 29,700 | 1.0 GiB | 4.1 h | 31 min |" in text
    # classifier: 10x ResNet-50's FLOPs -> 237.5 img/s; 150,000 x 24 images at 250,000 (its paper's size):
    # 1 GPU 15,158 s = 4.2 h, 8 GPUs 1,895 s = 32 min; at 29,700 the steps shrink by 29,700 / 250,000: 1 GPU 30 min
    row = [ln for ln in text.splitlines() if ln.startswith("| classifier")][0]
    assert row.endswith("| 245 | 238 | 3,600,000 (150,000 x 24) | 30 min | 4 min | < 1 min | 4.2 h | 32 min | 4 min |")
    # detection (MSVCL config: 50,000 steps x 8 at 29,700 images): training 3 x 49 = 147 GFLOP, 6x ResNet-50's 24.5
    # -> 2,375 / 6 = 395.8 img/s; 400,000 images: 1 GPU 1,010 s = 17 min, 8 GPUs 2 min; at 250,000 (x 8.418):
    # 8,506 s = 2.4 h, 8 GPUs 1,063 s = 18 min, 64 GPUs 133 s = 2 min
    row = [ln for ln in text.splitlines() if ln.startswith("| detection")][0]
    assert row.endswith("| 147 | 396 | 400,000 (50,000 x 8) | 17 min | 2 min | < 1 min | 2.4 h | 18 min | 2 min |")
    row = [ln for ln in text.splitlines() if ln.startswith("| matching")][0]  # a pair is 2 ROIs: 20,000 x 128 x 2
    assert "| 147 | 396 | 5,120,000 (20,000 x 128 x 2) |" in row
    assert [ln for ln in text.splitlines() if ln.startswith("| birads")][0].startswith("| birads (ResNet-50, 224 crops) | n/a")
    # CycleGAN: 10 pairs/s on one A100, 100,000 steps, the same for both dataset sizes
    row = [ln for ln in text.splitlines() if ln.startswith("| cyclegan")][0]
    assert row.count(f"{100_000 / 10 / 3600:,.1f} h") == 2


def test_beam_rows_measured_or_skipped():
    measured = {"cpu_count": 2, "images": 16, "local_1w_img_s": 3.0, "beam_1w_img_s": 2.0, "local_2w_img_s": 5.0,
                "beam_2w_img_s": 4.0}
    rows = run_all.rows({"benchmarks": {"build_beam": {"result": measured}}}, {})
    assert [(r[1], r[2].split(": ")[-1]) for r in rows] == [("2", "3"), ("4", "5")]
    skipped = run_all.rows({"benchmarks": {"build_beam": {"result": {"skipped": "not available: x"}}}}, {})
    assert skipped == [("TFRecord build on Beam", "not available: x", "", "")]


@pytest.mark.parametrize("seconds,text", [(30, "< 1 min"), (600, "10 min"), (7200, "2.0 h"), (3 * 86400, "3.0 days")])
def test_hours(seconds, text):
    assert run_all._hours(seconds) == text


def test_contrastive_rows_give_each_case_its_spread_and_cpu_ratio():
    case = {"views_per_sample": 4, "input_size": [224, 224], "images_per_s": {"pipeline": 8.0, "memory": 10.0,
            "pipeline_alone": 40.0}, "ratio_pipeline_over_memory": 0.8, "ratio_runs": [0.95, 0.8, 0.75],
            "cpu_ms_per_sample": {"pipeline": 100.0, "memory": 90.0}, "cpu_ratio_memory_over_pipeline": 0.9}
    cp = {**case, "input_size": [96, 64], "cases": {"at 224": case}}
    rows = run_all.rows({"benchmarks": {"contrastive_pipeline": {"result": cp}}}, {})
    assert len(rows) == 8 and sum("4 views at 224x224" in r[0] for r in rows) == 4
    ratio = [r for r in rows if "at 224" in r[0] and "pipeline / in-memory" in r[0]][0]
    assert ratio[0].endswith("(median of 3 paired runs, 0.75-0.95)") and ratio[1] == "0.8"
    assert [r for r in rows if "alone" in r[0]][0][2] == "4.0x the in-memory training rate"
    assert [r for r in rows if "CPU ms" in r[0]][0][1] == "100 / 90 (0.9)"
