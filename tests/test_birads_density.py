"""``--stage birads`` and ``--stage density`` (MSVCL v2 sections III-C, IV-B): labels, shared CC/MLO
augmentation, label_fraction in the stages' own streams, per-domain accuracy with bootstrap CIs, the CLI and
the exports (fresh process, plain TensorFlow)."""
import collections
import json

import numpy as np
import pytest
import tensorflow as tf

from mammodg.augment.downstream import BIRADS_CLASSES, crop_model_inputs, flip_scale, lesion_labels, stored_roi_crops
from mammodg.cli import main
from mammodg.config import TrainConfig, load
from mammodg.metrics.accuracy import accuracy_report
from mammodg.records.reader import all_shards, load_index
from mammodg.records.schema import parse
from mammodg.sampling.label_fraction import kept_patients

RATED = {"2": 0, "3": 0, "4A": 1, "4B": 2, "4C": 3, "5": 4}


def train_records(data_dir, split="train"):
    """Every record of a split as numpy-friendly dicts (no image)."""
    files = sorted(all_shards(load_index(data_dir), data_dir, split))
    out = []
    for raw in tf.data.TFRecordDataset(files):
        r = parse(raw, decode_image=False)
        out.append({k: (v.numpy().decode() if v.dtype == tf.string and v.shape.rank == 0 else v.numpy())
                    for k, v in r.items() if k != "image"})
    return out


def rated_masses(r):
    """Hand rule: the labels of a record's rated mass boxes (box BI-RADS, else the image's)."""
    out = []
    for cls, b in zip(r["lesion_class"], r["lesion_birads"]):
        b = b.decode() or r["birads"]
        if "mass" in cls.decode() and b in RATED:
            out.append(RATED[b])
    return out


def cfg_for(stage, data_dir, tmp_path, pairs=None, **sets):
    base = {"birads": ["birads.backbone=tiny", "birads.crop_size=32"],
            "density": ["density.backbone=tiny", "density.input_size=[64, 48]", f"density.pairs_dir={pairs or tmp_path / 'pairs'}"]}
    return [f"data_dir={data_dir}", f"run_dir={tmp_path / stage}", "batch_size=8", "steps=2", "val_every=2",
            "val_max_batches=2", "strategy=natural", *base[stage], *[f"{k}={v}" for k, v in sets.items()]]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_records):
    from mammodg.records.pairs import build_pairs

    out = tmp_path_factory.mktemp("bd") / "pairs"
    build_pairs(tiny_records, out, progress=False)
    return out


def test_lesion_labels_by_hand():
    r = {"lesion_birads": tf.constant(["4B", "", "4", "5", "3", "6"]), "birads": tf.constant("4C"),
         "lesion_class": tf.constant(["malignant_mass", "benign_mass", "benign_mass", "malignant_calc",
                                      "benign_mass", "malignant_mass"])}
    keep, label = lesion_labels(r, masses_only=True)
    # 4B -> 2; "" -> the image's 4C -> 3; an undivided 4 and 6 are unrated; the calcification is left out
    np.testing.assert_array_equal(keep.numpy(), [True, True, False, False, True, False])
    np.testing.assert_array_equal(label.numpy()[keep.numpy()], [2, 3, 0])
    keep, label = lesion_labels(r, masses_only=False)
    np.testing.assert_array_equal(label.numpy(), [2, 3, -1, 4, 0, -1])
    assert len(BIRADS_CLASSES) == 5


def test_accuracy_report_by_hand_and_bootstrap():
    rng = np.random.default_rng(0)
    segs = np.array(["A"] * 40 + ["B"] * 60 + ["C"] * 30)
    y = rng.integers(0, 3, segs.size)
    p = np.where(rng.random(segs.size) < 0.7, y, (y + 1) % 3)
    rep = accuracy_report(y, p, segs, seen=["A", "B"], n_boot=4000, seed=1)
    acc = {s: float((y == p)[segs == s].mean()) for s in "ABC"}
    for s in "ABC":
        d = rep["domains"][s]
        assert d["accuracy"] == pytest.approx(acc[s]) and d["seen"] == (s != "C")
        assert d["majority_rate"] == pytest.approx(np.bincount(y[segs == s]).max() / (segs == s).sum())
        # the binomial draw is the index-resampling bootstrap: compare with explicit resamples
        c = (y == p)[segs == s]
        ref = np.percentile(c[rng.integers(0, c.size, (4000, c.size))].mean(1), [2.5, 97.5])
        assert d["ci_low"] == pytest.approx(ref[0], abs=0.03) and d["ci_high"] == pytest.approx(ref[1], abs=0.03)
    assert rep["seen_average"]["accuracy"] == pytest.approx((acc["A"] + acc["B"]) / 2)
    assert rep["unseen_average"]["accuracy"] == pytest.approx(acc["C"]) and rep["unseen_average"]["domains"] == ["C"]
    assert rep["seen_average"]["ci_low"] < rep["seen_average"]["accuracy"] < rep["seen_average"]["ci_high"]
    assert rep["global"]["accuracy"] == pytest.approx(float((y == p).mean()))


def test_flip_scale_shares_one_draw():
    imgs = tf.random.stateless_uniform([2, 20, 16, 1], [1, 2])
    found_change = False
    for i in range(6):
        seed = tf.constant([3, i], tf.int64)
        both = flip_scale(imgs, seed, flip=True, scale_range=[0.7, 1.3], fill_value=0.25).numpy()
        for k in range(2):  # each image alone with the same seed: the same transform
            alone = flip_scale(imgs[k:k + 1], seed, flip=True, scale_range=[0.7, 1.3], fill_value=0.25).numpy()
            np.testing.assert_allclose(both[k], alone[0], atol=1e-6)
        found_change |= not np.allclose(both, imgs.numpy(), atol=1e-3)
    assert found_change


def test_density_views_share_augmentation(tiny_records, pairs, tmp_path):
    from mammodg.augment.downstream import density_input
    from mammodg.stages.density import augment_breast, breast_views, density_batches

    cfg = load(TrainConfig, "demo/density.yaml", cfg_for("density", tiny_records, tmp_path, pairs) + ["stage=density"])
    files = sorted(all_shards(load_index(pairs), pairs, "train"))
    c = cfg.density
    checked = 0
    for i, raw in enumerate(tf.data.TFRecordDataset(files).take(6)):
        b = breast_views(raw, cfg)
        if b["label"] < 0 or b["weight"][1] == 0:
            continue
        out = augment_breast(tf.constant(i, tf.int64), b, cfg)
        seed = tf.constant([cfg.seed, i], tf.int64)
        for k in range(2):  # view k alone, augmented with the breast's seed
            x = density_input(b["views"][k], c.input_size, cfg.target_mean)[None]
            ref = flip_scale(x, seed, flip=c.flip, scale_range=c.scale_range, fill_value=cfg.target_mean)[0]
            np.testing.assert_allclose(out["x"][k].numpy(), ref.numpy(), atol=1e-5)
        assert not np.allclose(out["x"][0], out["x"][1])  # the two views differ: the check has teeth
        checked += 1
    assert checked >= 2
    x, y, w = next(iter(density_batches(cfg)))
    assert x.shape == (8, 64, 48, 1) and np.all(y.numpy()[0::2] == y.numpy()[1::2])


@pytest.mark.parametrize("stage", ["birads", "density"])
def test_label_fraction_keeps_whole_patients_in_stream(stage, tiny_records, pairs, tmp_path):
    from mammodg.stages.birads import birads_samples
    from mammodg.stages.density import density_samples

    cfg = load(TrainConfig, f"demo/{stage}.yaml", cfg_for(stage, tiny_records, tmp_path, pairs, label_fraction=0.4) + [f"stage={stage}"])
    if stage == "birads":
        per_patient = collections.Counter()
        for r in train_records(tiny_records):
            per_patient[r["patient"]] += len(rated_masses(r))
        samples = birads_samples(cfg)
    else:
        per_patient = collections.Counter()
        for r in train_records(pairs):
            per_patient[r["patient"]] += r["density"] in "ABCD" and r["density"] != ""
        samples = density_samples(cfg)
    kept = kept_patients(per_patient, 0.4)
    expected = {p for p in kept if per_patient[p]}
    total = sum(per_patient[p] for p in expected)
    assert 0 < len(expected) < len({p for p in per_patient if per_patient[p]})
    seen = collections.Counter(s["patient"].numpy().decode() for s in samples.take(3 * total + 64))
    assert set(seen) == expected  # every kept patient, nobody else
    again = {s["patient"].numpy().decode() for s in samples.take(3 * total + 64)}
    assert again == expected


def test_birads_cli_train_evaluate_export(tiny_records, tmp_path, capsys):
    from test_export import serve

    from mammodg.stages.birads import birads_predictions, build_birads_model

    sets = cfg_for("birads", tiny_records, tmp_path)
    assert main(["train", "--stage", "birads", *sum([["--set", s] for s in sets], [])]) == 0
    run = tmp_path / "birads"
    assert main(["evaluate", "--stage", "birads", "--run", str(run), "--n-boot", "200"]) == 0
    rep = json.loads((run / "accuracy_val" / "accuracy.json").read_text())
    cfg = load(TrainConfig, run / "config.yaml")
    model = build_birads_model(cfg)
    model.load_weights(run / "best.weights.h5")
    probs, y, segs = birads_predictions(model, cfg, "val")
    labels = collections.defaultdict(list)
    for r in train_records(tiny_records, "val"):
        labels[r["data_segment"]] += rated_masses(r)
    assert {s: d["n"] for s, d in rep["domains"].items()} == {s: len(v) for s, v in labels.items() if v}
    for s, v in labels.items():  # the crops carry the hand rule's labels
        assert sorted(y[segs == s]) == sorted(v)
    for s, d in rep["domains"].items():
        assert d["accuracy"] == pytest.approx(float((probs.argmax(1) == y)[segs == s].mean()))
        assert d["ci_low"] <= d["accuracy"] <= d["ci_high"] and d["seen"]
    assert "majority" in (run / "accuracy_val" / "accuracy.md").read_text()
    # export: uint16 crops in a fresh process, and records (every box) in this one
    r = train_records(tiny_records, "val")
    raws = [raw for raw in tf.data.TFRecordDataset(sorted(all_shards(load_index(tiny_records), tiny_records, "val")))]
    with_boxes = [raw for raw in raws if len(parse(raw)["boxes"])][:3]
    crops = np.concatenate([stored_roi_crops(parse(raw)["image"], parse(raw)["boxes"], 32, 0.2).numpy() for raw in with_boxes])
    keras_p = tf.nn.softmax(model(crop_model_inputs(crops, cfg.target_mean))).numpy()
    out = serve(tmp_path, {run / "saved_model": crops})[run / "saved_model"]
    np.testing.assert_allclose(out["images/probabilities"], keras_p, atol=1e-5)
    np.testing.assert_array_equal(out["images/birads_class"], keras_p.argmax(1))
    ex = tf.saved_model.load(str(run / "saved_model")).signatures["serve_examples"](examples=tf.constant([raw.numpy() for raw in with_boxes]))
    np.testing.assert_allclose(ex["probabilities"].numpy(), keras_p, atol=1e-5)
    assert len(r) and ex["box_index"].shape[0] == len(crops)


def test_density_cli_train_evaluate_export(tiny_records, pairs, phantoms, tmp_path):
    from test_export import both, serve, stored_images

    from mammodg.augment.downstream import density_input
    from mammodg.stages.density import build_density_model

    sets = cfg_for("density", tiny_records, tmp_path, pairs)
    assert main(["train", "--stage", "density", *sum([["--set", s] for s in sets], [])]) == 0
    run = tmp_path / "density"
    assert main(["evaluate", "--stage", "density", "--run", str(run), "--n-boot", "200"]) == 0
    rep = json.loads((run / "accuracy_val" / "accuracy.json").read_text())
    counts = collections.Counter(r["data_segment"] for r in train_records(tiny_records, "val") if r["density"])
    assert {s: d["n"] for s, d in rep["domains"].items()} == dict(counts)
    assert rep["seen_average"]["ci_low"] <= rep["seen_average"]["accuracy"] <= rep["seen_average"]["ci_high"]
    # other data (--data): its segments (by manufacturer only) are not the run's, so every domain is unseen
    from mammodg.config import BuildConfig, PreprocessConfig
    from mammodg.records.writer import build

    other = tmp_path / "vendors"
    build(phantoms, other, BuildConfig(preprocess=PreprocessConfig(height=64, width=48), segment_keys=["manufacturer"],
                                       pseudonym_salt="test-salt-16chars", workers=1), progress=False)
    assert main(["evaluate", "--stage", "density", "--run", str(run), "--data", str(other), "--n-boot", "200"]) == 0
    unseen = json.loads((run / "accuracy_vendors_val" / "accuracy.json").read_text())
    assert unseen["seen_average"] is None and not any(d["seen"] for d in unseen["domains"].values())
    assert unseen["unseen_average"]["accuracy"] == pytest.approx(np.mean([d["accuracy"] for d in unseen["domains"].values()]))
    assert len(unseen["domains"]) == 3
    cfg = load(TrainConfig, run / "config.yaml")
    model = build_density_model(cfg)
    model.load_weights(run / "best.weights.h5")
    images = stored_images(3, 80, 60)
    x = np.stack([density_input(tf.constant(im), cfg.density.input_size, cfg.target_mean).numpy() for im in images])
    keras_p = tf.nn.softmax(model(x)).numpy()
    out = serve(tmp_path, {run / "saved_model": images})[run / "saved_model"]
    np.testing.assert_allclose(both(out, "probabilities", 3), keras_p, atol=1e-5)
    np.testing.assert_array_equal(both(out, "dense", 3), keras_p.argmax(1))


def test_missing_pairs_or_no_labels_is_exit_2(tiny_records, tmp_path, capsys):
    sets = cfg_for("density", tiny_records, tmp_path)
    assert main(["train", "--stage", "density", *sum([["--set", s] for s in sets], [])]) == 2
    assert "mammodg build-pairs" in capsys.readouterr().err
    sets = cfg_for("birads", tiny_records, tmp_path, label_fraction=1e-9)
    assert main(["train", "--stage", "birads", *sum([["--set", s] for s in sets], [])]) == 2
    assert "no rated mass boxes to train on" in capsys.readouterr().err


def test_backbone_from_contrastive_run(tmp_path):
    """``backbone_from``: the contrastive run's backbone.weights.h5 lands in the classifier's ResNet-50."""
    from mammodg.config import BiradsConfig
    from mammodg.models.resnet import resnet50_backbone
    from mammodg.stages.downstream import downstream_model, init_backbone

    tf.keras.utils.set_random_seed(1)
    source = resnet50_backbone((32, 32, 1))
    source.save_weights(tmp_path / "backbone.weights.h5")
    c = BiradsConfig(backbone_from=str(tmp_path), crop_size=32)
    model = downstream_model(c, (32, 32, 1), 5, "birads_classifier")
    inner = model.get_layer("backbone_features")
    assert not np.allclose(inner.get_layer("conv1_conv").kernel.numpy(), source.get_layer("conv1_conv").kernel.numpy())
    init_backbone(c, (32, 32, 1))(model)
    for name in ("conv1_conv", "conv3_block2_2_bn", "conv5_block3_3_conv"):
        for a, b in zip(inner.get_layer(name).get_weights(), source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
