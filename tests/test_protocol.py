"""The leave-vendors-out protocol (issue 19): the downstream stages start from a contrastive run's own encoder
(ResNet-18 of its width, read from its config.yaml), detection and matching train only on the patients
``label_fraction`` keeps, and ``pipelines/msvcl_v2.py`` never recomputes a finished cell."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from mammodg.config import TrainConfig, load, save
from mammodg.records.reader import all_shards, load_index
from mammodg.records.schema import parse
from mammodg.sampling.label_fraction import kept_patients

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resnet18_run(tmp_path_factory):
    """A contrastive run folder as the stage leaves it: config.yaml (resnet18, width 0.25) and the backbone's
    weights (random but seeded, and with BatchNorm statistics moved off 0/1 so they are checked too)."""
    import keras

    from mammodg.models.resnet import resnet18_backbone

    run = tmp_path_factory.mktemp("contrastive_run")
    save(load(TrainConfig, None, ["stage=contrastive", "contrastive.backbone=resnet18", "contrastive.width=0.25"]),
         run / "config.yaml")
    keras.utils.set_random_seed(7)
    source = resnet18_backbone((64, 48, 1), width=0.25)
    source.set_weights([w + np.random.default_rng(i).normal(0, 0.1, w.shape).astype(w.dtype) ** 2
                        for i, w in enumerate(source.get_weights())])
    source.save_weights(run / "backbone.weights.h5")
    return run, source.get_weights()


def _same(a, b):
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


def test_each_downstream_stage_starts_from_the_resnet18_run(resnet18_run):
    from mammodg.augment.matching_pairs import build_matcher
    from mammodg.models.resnet import FEATURES_NAME
    from mammodg.stages.birads import build_birads_model
    from mammodg.stages.density import build_density_model
    from mammodg.stages.detection import build_detector
    from mammodg.stages.downstream import init_backbone

    run, weights = resnet18_run
    sets = [f"birads.backbone_from={run}", "birads.crop_size=48", f"density.backbone_from={run}",
            "density.input_size=[64, 48]", f"detection.backbone_from={run}", "detection.input_size=[64, 48]",
            "detection.levels=[3, 4, 5]", "detection.width=16", "detection.groups=8", "detection.tower_convs=1",
            f"matching.backbone_from={run}", "matching.roi_size=48"]
    cfg = load(TrainConfig, None, sets)
    # birads and density: built as the run's encoder (random), then after_build loads the run's weights
    for build, section, shape in ((build_birads_model, cfg.birads, (48, 48, 1)),
                                  (build_density_model, cfg.density, (64, 48, 1))):
        model = build(cfg)
        inner = model.get_layer(FEATURES_NAME)
        assert not _same(inner.get_weights(), weights)  # the check below can fail
        init_backbone(section, shape)(model)
        assert _same(inner.get_weights(), weights)
    # detection and matching load the weights when they build the model
    assert _same(build_detector(cfg).get_layer(FEATURES_NAME).get_weights(), weights)
    assert _same(build_matcher(cfg).get_layer("embedding").get_layer(FEATURES_NAME).get_weights(), weights)
    # without backbone_from: a random ResNet-50 as before
    plain = build_birads_model(load(TrainConfig, None, ["birads.crop_size=32"]))
    assert len(plain.get_layer(FEATURES_NAME).get_weights()) > 2 * len(weights)


def test_resnet18_features_are_the_encoder_stages(resnet18_run):
    """C5 pooled equals the contrastive backbone's output on the same image (same network, same weights)."""
    from mammodg.models.resnet import encoder_features, resnet18_backbone

    run, weights = resnet18_run
    features = encoder_features("resnet18", (64, 48, 1), width=0.25, weights=run / "backbone.weights.h5")
    backbone = resnet18_backbone((64, 48, 1), width=0.25)
    backbone.set_weights(weights)
    x = np.random.default_rng(0).uniform(size=(2, 64, 48, 1)).astype("float32")
    out = features(x)
    assert [tuple(out[f"c{lv}"].shape[1:3]) for lv in (3, 4, 5)] == [(8, 6), (4, 3), (2, 2)]
    np.testing.assert_allclose(np.asarray(out["c5"]).mean(axis=(1, 2)), np.asarray(backbone(x)), rtol=1e-5, atol=1e-6)


def _owners(data_dir, split="train"):
    """image_id -> patient of every record of a split (read independently of the stages)."""
    out = {}
    for raw in tf.data.TFRecordDataset(sorted(all_shards(load_index(data_dir), data_dir, split))):
        r = parse(raw, decode_image=False)
        out[r["image_id"].numpy().decode()] = r["patient"].numpy().decode()
    return out


def test_detection_trains_only_on_kept_patients(tiny_records, tmp_path):
    from mammodg.stages.detection import training_batches

    owners = _owners(tiny_records)
    kept = kept_patients(owners.values(), 0.4)
    assert 0 < len(kept) < len(set(owners.values()))
    cfg = load(TrainConfig, "demo/detection.yaml", [f"data_dir={tiny_records}", f"run_dir={tmp_path}",
                                                    "label_fraction=0.4", "batch_size=8", "strategy=natural"])
    kept_images = sum(p in kept for p in owners.values())
    batches = training_batches(cfg, lambda i, raw: parse(raw, decode_image=False)["patient"])
    seen = {p.decode() for b in batches.take(3 * kept_images // 8 + 4) for p in b.numpy()}
    assert seen == kept  # every kept patient, nobody else


def test_matching_trains_only_on_kept_patients(tiny_records, tmp_path):
    from mammodg.augment.matching_pairs import breasts
    from mammodg.stages.matching import matching_data

    owners = _owners(tiny_records)
    cfg = load(TrainConfig, "demo/matching.yaml", [f"data_dir={tiny_records}", f"run_dir={tmp_path}",
                                                   "label_fraction=0.4", "matching.roi_size=32"])
    kept = kept_patients(owners.values(), 0.4)
    found = breasts(tiny_records, "train", cfg.matching.lesion_classes)
    expected = [b for b in found if owners[b["CC"]["image_id"]] in kept]
    assert 0 < len(expected) < len(found)
    data = matching_data(cfg, "train")
    assert len(data["images"]) == 2 * len(expected)
    for im, view in zip(data["images"], [b[v] for b in expected for v in ("CC", "MLO")]):
        np.testing.assert_array_equal(im["gt_boxes"], view["gt_boxes"])
        assert im["domain"] == view["domain"]
    val = matching_data(cfg, "val")  # evaluation splits are never subsampled
    assert len(val["images"]) == 2 * len(breasts(tiny_records, "val", cfg.matching.lesion_classes))


def test_matching_domain_scores_by_hand():
    """Pairs take their CC image's domain; accuracy at D < margin / 2 per domain, worked out by hand."""
    from mammodg.stages.matching import domain_scores

    data = {"rois": np.zeros((6, 1)), "images": [{"domain": "A", "rois": np.array([0, 1])},
                                                 {"domain": "A", "rois": np.array([2])},
                                                 {"domain": "B", "rois": np.array([3])},
                                                 {"domain": "B", "rois": np.array([4, 5])}],
            "a": np.array([0, 1, 0, 3]), "b": np.array([2, 2, 2, 4]), "y": np.array([1, 0, 0, 1])}
    d = np.array([1.0, 2.0, 9.0, 6.0])  # margin 10: predicted match when d < 5 -> 1, 1, 0, 0
    out = domain_scores(d, data, 10.0)
    assert sorted(out) == ["A", "B"]
    assert out["A"]["accuracy"] == pytest.approx(2 / 3) and out["A"]["pairs"] == 3 and out["A"]["positives"] == 1
    assert out["B"]["accuracy"] == 0.0 and out["B"]["pairs"] == 1


@pytest.mark.parametrize("stage, message", [("detection", "no images to train on"),
                                            ("matching", "no CC/MLO candidate pair at label_fraction")])
def test_fraction_keeping_nobody_is_a_one_line_error(stage, message, tiny_records, tmp_path, capsys):
    from mammodg.cli import main

    sets = [f"data_dir={tiny_records}", f"run_dir={tmp_path / stage}", "label_fraction=1e-9", "steps=1", "val_every=1"]
    assert main(["train", "--stage", stage, "--config", f"demo/{stage}.yaml", *sum([["--set", s] for s in sets], [])]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------------ the pipeline
def _pipeline():
    spec = importlib.util.spec_from_file_location("msvcl_v2", REPO / "pipelines" / "msvcl_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_resumes_without_recomputing_a_cell(tmp_path, monkeypatch):
    """Run, re-run (nothing recomputed), delete one cell's file (only that cell recomputed); the table has
    every cell, with the averages worked out by hand."""
    p = _pipeline()
    calls = []
    value = {"detection": 0.30, "matching": 0.60, "birads": 0.40, "density": 0.70}

    def fake_downstream(spec, out, data, pairs, task, method, fraction):
        calls.append((task, method, fraction))
        bonus = {"random": 0.0, "msvcl": 0.1}[method]
        return {"task": task, "method": method, "fraction": fraction, "seen_avg": value[task] + bonus,
                "unseen_avg": value[task] + bonus - 0.2 + 0.1 * fraction}

    monkeypatch.setattr(p, "check_spec", lambda path: yaml.safe_load(Path(path).read_text()))  # no stage configs here
    monkeypatch.setattr(p, "build_data", lambda spec, out: calls.append("data") or {})
    monkeypatch.setattr(p, "style_cells", lambda spec, out, data: calls.append("styles") or out / "pairs")
    monkeypatch.setattr(p, "pretrain", lambda spec, out, data, pairs, m: calls.append(("pretrain", m)) or {})
    monkeypatch.setattr(p, "downstream", fake_downstream)
    spec = {"out_dir": str(tmp_path / "out"), "seed": 0, "data": {"seen": ["A"], "unseen": ["B"]},
            "methods": ["random", "msvcl"], "tasks": ["detection", "matching", "birads", "density"],
            "label_fractions": [0.5], "fraction_tasks": ["detection"]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert p.main(["--config", str(tmp_path / "spec.yaml")]) == 0
    first = list(calls)
    assert first.count("data") == 1 and sum(isinstance(c, tuple) and c[0] == "pretrain" for c in first) == 2
    expected = [(t, m, 1.0) for t in spec["tasks"] for m in spec["methods"]]
    expected += [("detection", m, 0.5) for m in spec["methods"]]
    assert sorted(c for c in first if isinstance(c, tuple) and len(c) == 3) == sorted(expected)
    calls.clear()
    assert p.main(["--config", str(tmp_path / "spec.yaml")]) == 0
    assert calls == ["styles"]  # style_cells itself skips its own finished cells (stubbed here)
    out = tmp_path / "out"
    (out / "cells" / "birads_msvcl_f1.json").unlink()
    calls.clear()
    p.main(["--config", str(tmp_path / "spec.yaml")])
    assert calls == ["styles", ("birads", "msvcl", 1.0)]
    table = (out / "table3.md").read_text().splitlines()
    assert len(table) == 4 and "n/a" not in "\n".join(table)
    # msvcl: seen 40, 70, 50, 80 -> avg 60; unseen (+0.1 - 0.2) 30, 60, 40, 70 -> avg 50
    assert table[3].split("|")[1:-1] == [" msvcl ", " 40.0 ", " 70.0 ", " 50.0 ", " 80.0 ", " 60.0 ",
                                         " 30.0 ", " 60.0 ", " 40.0 ", " 70.0 ", " 50.0 "]
    results = json.loads((out / "results.json").read_text())
    assert results["figure6"][0]["unseen_avg"]["random"] == pytest.approx([0.30 - 0.2 + 0.05, 0.30 - 0.2 + 0.1])
    assert (out / "figure6_detection.png").stat().st_size > 1000


@pytest.mark.parametrize("edit, field", [("methods: [random, simclr, mscl, mvcl, msvcl]", "methods: [random, foo]"),
                                         ("steps=1000", "stepz=1000")])
def test_bad_spec_is_a_one_line_error_before_any_work(tmp_path, capsys, edit, field):
    spec = Path(__file__).resolve().parents[1] / "mammodg" / "configs" / "protocol" / "demo.yaml"
    text = spec.read_text()
    assert edit in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(edit, field))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        "msvcl_v2_bad", Path(__file__).resolve().parents[1] / "pipelines" / "msvcl_v2.py"))
    mod.__spec__.loader.exec_module(mod)
    assert mod.main(["--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and ("foo" in err or "stepz" in err)
    assert not (tmp_path / "out").exists()
