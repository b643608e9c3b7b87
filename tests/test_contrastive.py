"""Pair records and pair builders of the contrastive stage (MSVCL v2 III-B), end to end on phantoms."""
import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from mammodg.config import TrainConfig
from mammodg.preprocess.breast import from_stored, resize_stored, to_stored
from mammodg.records.pairs import build_pairs, parse_pair
from mammodg.records.reader import all_shards, load_index
from mammodg.records.schema import model_input, parse
from mammodg.augment import METHODS, pair_decoder, view_sides, views_per_sample


class GammaTransfer:
    """A stand-in for the CycleGAN generators: style k is v ** (k + 2) / 1.5 (deterministic, testable)."""

    def __init__(self, styles):
        self.styles = styles

    def __call__(self, v, dst):
        return np.power(v, self.styles.index(dst) + 2) / 1.5

    def transfer(self, images01, masks, src, dst):
        return np.where(masks, self(images01, dst), 0).astype(np.float32)


def _records(data_dir, fn):
    index = load_index(data_dir)
    return [fn(raw) for split in index["splits"] for raw in tf.data.TFRecordDataset(sorted(all_shards(index, data_dir, split)))]


@pytest.fixture(scope="module")
def pairs(tiny_records, tmp_path_factory):
    styles = sorted(load_index(tiny_records)["segments"])[:2]  # two seen styles; the third keeps its own only
    out = tmp_path_factory.mktemp("pairs")
    build_pairs(tiny_records, out, transfer=GammaTransfer(styles), progress=False)
    return out, styles


def _source_images(tiny_records):
    def meta(raw):
        r = parse(raw)
        return (r["image_id"].numpy().decode(), {k: r[k].numpy().decode() for k in ("patient", "laterality", "view", "data_segment")}
                | {"image": r["image"].numpy()[..., 0]})
    return dict(_records(tiny_records, meta))


def test_pair_records_group_breasts_and_hold_every_seen_style(tiny_records, pairs):
    out, styles = pairs
    src = _source_images(tiny_records)
    recs = _records(out, lambda raw: {k: v.numpy() for k, v in parse_pair(raw).items()})
    index = load_index(out)
    assert index["kind"] == "pairs" and index["records"] == len(recs)
    used = collections.Counter()
    for r in recs:
        ids = [i.decode() for i in r["image_ids"]]
        views = [v.decode() for v in r["views"]]
        metas = [src[i] for i in ids]
        used.update(ids)
        assert {m["patient"] for m in metas} == {r["patient"].decode()}  # same patient ...
        assert {m["laterality"] for m in metas} == {r["laterality"].decode()}  # ... and breast
        assert [m["view"] for m in metas] == views
        if len(views) == 2:
            assert views == ["CC", "MLO"]
        seg = r["data_segment"].decode()
        rec_styles = [s.decode() for s in r["styles"]]
        assert rec_styles[0] == seg
        assert rec_styles == ([seg] + [s for s in styles if s != seg] if seg in styles else [seg])
        pngs = r["images"].reshape(len(views), len(rec_styles))
        for v, meta in enumerate(metas):
            own = tf.io.decode_png(pngs[v, 0], dtype=tf.uint16).numpy()[..., 0]
            np.testing.assert_array_equal(own, meta["image"])  # the source image, exactly
            val, mask = from_stored(meta["image"])
            for k, dst in enumerate(rec_styles[1:], start=1):
                styled = tf.io.decode_png(pngs[v, k], dtype=tf.uint16).numpy()[..., 0]
                np.testing.assert_array_equal(styled, to_stored(GammaTransfer(styles)(val, dst), mask))
    assert set(used) == set(src) and max(used.values()) == 1  # every image in exactly one breast record
    assert index["stats"]["both_views"] >= 0.8 * index["records"]


def test_pair_records_transfer_at_the_stored_scale_then_resize(tiny_records, tmp_path):
    """The generators learned the stored scale: transfer first, then resize to ``size`` (gamma is nonlinear,
    so resizing first would give other values)."""
    index = load_index(tiny_records)
    styles = sorted(index["segments"])[:2]
    size = (index["image_shape"][0] // 2, index["image_shape"][1] // 2)
    build_pairs(tiny_records, tmp_path, transfer=GammaTransfer(styles), size=size, progress=False)
    src = _source_images(tiny_records)
    checked = 0
    for r in _records(tmp_path, lambda raw: {k: v.numpy() for k, v in parse_pair(raw).items()}):
        pngs = r["images"].reshape(len(r["views"]), len(r["styles"]))
        for v, image_id in enumerate(r["image_ids"]):
            stored = src[image_id.decode()]["image"]
            val, mask = from_stored(stored)
            expected = [stored] + [to_stored(GammaTransfer(styles)(val, s.decode()), mask) for s in r["styles"][1:]]
            for png, e in zip(pngs[v], expected):
                np.testing.assert_array_equal(tf.io.decode_png(png, dtype=tf.uint16).numpy()[..., 0], resize_stored(e, *size))
            checked += len(r["styles"]) > 1
    assert checked >= 4


def _decoder(method="msvcl", *, crop_overlap=True, seed=0, **crop):
    """:func:`pair_decoder` with the contrastive config's defaults for what ``crop`` does not set."""
    c = TrainConfig().contrastive
    crop = dict(dict(input_size=c.input_size, crop_scale=c.crop_scale, rotation_deg=c.rotation_deg, jitter=c.jitter,
                     target_mean=TrainConfig().target_mean), **crop)
    return pair_decoder(method, seed, crop_overlap=crop_overlap, **crop)


def _recording(monkeypatch, name):
    """Replace ``mammodg.augment.pairs.<name>`` by a wrapper recording (args, kwargs, result) of each call."""
    import mammodg.augment.pairs as module

    calls, real = [], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs, real(*args, **kwargs)))
        return calls[-1][2]

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_decoder_renders_the_chosen_styles_and_views(pairs, monkeypatch):
    """With augmentation off, each side is exactly model_input of the chosen blend (maybe mirrored)."""
    out, styles = pairs
    raws = list(tf.data.TFRecordDataset(sorted(all_shards(load_index(out), out, "train"))).take(6))
    chosen = _recording(monkeypatch, "choose")
    decode = _decoder("msvcl", rotation_deg=0.0, crop_scale=[1.0, 1.0], jitter=0.0, input_size=[64, 48])
    from mammodg.records.pairs import patient_group_id

    for i, raw in enumerate(raws):
        views, group = decode(tf.constant(i, tf.int64), raw)
        assert sorted(views) == ["view1", "view2", "view3", "view4"]
        r = parse_pair(raw)
        assert int(group) == int(patient_group_id(r["patient"]))  # the patient's group id, for NT-Xent's groups
        c = chosen[-1][2]
        n_styles = int(tf.size(r["styles"]))
        for side in ("1", "2", "3", "4"):
            v = int(c[f"view{side}"])
            a, b, alpha = int(c[f"style{side}_a"]), int(c[f"style{side}_b"]), float(c[f"alpha{side}"])
            img = [tf.io.decode_png(r["images"][v * n_styles + k], dtype=tf.uint16).numpy().astype(np.float32) for k in (a, b)]
            ref = model_input(img[0] * (1 - alpha) + img[1] * alpha, TrainConfig().target_mean).numpy()
            got = views[f"view{side}"].numpy()
            err = min(np.abs(got - ref).max(), np.abs(got - ref[:, ::-1]).max())
            assert err < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_crops_of_one_view_share_a_breast_point(pairs, monkeypatch, method):
    """crop_overlap: the sides showing the same view of the breast are cropped around one breast point
    (every style of a view has the same mask); sides of different views, or crop_overlap off, not. The
    multi-view sides are cropped at view_crop_scale, free of the point; the others at crop_scale."""
    out, _ = pairs
    raws = list(tf.data.TFRecordDataset(sorted(all_shards(load_index(out), out, "train"))).take(8))
    chosen, crops = _recording(monkeypatch, "choose"), _recording(monkeypatch, "augment")
    shared = 0
    for overlap in (True, False):
        decode = _decoder(method, crop_overlap=overlap, input_size=[16, 12], crop_scale=[0.1, 0.2],
                          view_crop_scale=[0.7, 0.9])
        for i, raw in enumerate(raws):
            crops.clear()
            decode(tf.constant(i, tf.int64), raw)
            c = chosen[-1][2]
            k = views_per_sample(method)
            assert len(crops) == k
            points = [kwargs.get("point") for _, kwargs, _ in crops]
            scales = [kwargs["crop_scale"] for _, kwargs, _ in crops]
            assert scales == [[0.7, 0.9] if s + 1 in view_sides(method) else [0.1, 0.2] for s in range(k)]
            assert all(points[s - 1] is None for s in view_sides(method))
            if not overlap:
                assert all(p is None for p in points)
                continue
            small = [s for s in range(k) if s + 1 not in view_sides(method)]
            for s in small:
                img, p = crops[s][0][0], points[s]
                h, w = img.shape[:2]
                assert img[int(p[0] * h), int(p[1] * w), 0] >= 1.0  # a breast pixel
            for s in small:
                for t in [t for t in small if t > s]:
                    same_view = int(c[f"view{s + 1}"]) == int(c[f"view{t + 1}"])
                    assert np.array_equal(points[s].numpy(), points[t].numpy()) == same_view
                    shared += same_view
    assert shared >= (0 if method == "mvcl" else len(raws))


def test_groups_mask_the_other_breast_of_a_patient(pairs):
    """The decoder's group ids reach NTXent(groups=True): in a batch holding both breasts of a patient,
    their cross similarities are not negatives. Checked against eq. (1) in numpy with those entries removed."""
    from mammodg.losses import NTXent

    out, _ = pairs
    raws = list(tf.data.TFRecordDataset(sorted(all_shards(load_index(out), out, "train"))))
    decode = _decoder("mvcl", input_size=[16, 12])
    groups = np.array([int(decode(tf.constant(i, tf.int64), raw)[1]) for i, raw in enumerate(raws)])
    patients = [parse_pair(raw)["patient"].numpy() for raw in raws]
    assert all((groups[a] == groups[b]) == (patients[a] == patients[b]) for a in range(len(raws)) for b in range(a))
    n = len(raws)
    assert len(set(groups)) < n  # some patient has both breasts in the batch
    z = np.random.default_rng(0).normal(size=(n, 2, 8)).astype(np.float32)
    got = float(NTXent(0.5, cross_replica=False, groups=True)(groups.astype(np.float32), z))  # y_true cast as Keras does
    u = np.concatenate([z[:, 0], z[:, 1]])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sim, g, ref = u @ u.T / 0.5, np.concatenate([groups, groups]), []
    for a in range(2 * n):
        pos = (a + n) % (2 * n)
        keep = [b for b in range(2 * n) if b != a and (g[b] != g[a] or b == pos)]
        ref.append(-sim[a, pos] + np.log(np.exp(sim[a, keep]).sum()))
    assert got == pytest.approx(np.mean(ref), rel=1e-5)
    assert got != pytest.approx(float(NTXent(0.5, cross_replica=False)(groups, z)), rel=1e-3)  # the mask matters


def test_pair_scores_per_type_with_exact_chance():
    """Validation scores on a hand-made embedding: per pair type, top-1 hits and chance 1 / (2N - 1 - the
    anchor's masked same-patient candidates)."""
    from mammodg.stages.contrastive import pair_scores

    e = np.eye(8, dtype=np.float32)
    z = np.stack([e[:4], e[:4], e[4:], e[[5, 4, 6, 7]]], axis=1)  # (4 samples, 4 views, 8)
    groups = np.array([7, 7, 8, 9])  # samples 0 and 1: both breasts of one patient
    scores = pair_scores(z, groups, "msvcl", 0.1)
    assert set(scores) == {"multi_style", "multi_view"}
    chance = np.array([1 / 5, 1 / 5, 1 / 7, 1 / 7] * 2)  # 2N - 1 = 7 candidates, less 2 for patient 7's anchors
    for kind in scores:
        np.testing.assert_allclose(scores[kind]["top1_chance"], chance)
    np.testing.assert_array_equal(scores["multi_style"]["top1"], np.ones(8))  # identical positives
    # multi-view: samples 0 and 1 (one patient) have swapped MLOs: masked, the swapped partner is not retrieved
    assert scores["multi_view"]["top1"][[2, 3, 6, 7]].all()
    assert scores["multi_view"]["top1"][[0, 1]].sum() < 2  # ties at 0: the first candidate, not the swapped one
    assert np.isfinite(scores["multi_view"]["nt_xent"]).all() and scores["multi_view"]["nt_xent"].shape == (8,)


def test_top1_p_value_is_the_exact_binomial_tail():
    """Equal chances: scipy's binomial tail P(X >= k); unequal ones: the tail by enumerating every outcome."""
    import itertools

    from scipy.stats import binom, binomtest

    from mammodg.metrics import top1_above_chance_p

    for n, k, p in ((72, 5, 1 / 70), (72, 0, 1 / 70), (64, 9, 1 / 62), (10, 10, 0.3)):
        hits = np.arange(n) < k
        got = top1_above_chance_p(hits, np.full(n, p))
        np.testing.assert_allclose(got, binom.sf(k - 1, n, p), rtol=1e-9)
        np.testing.assert_allclose(got, binomtest(k, n, p, alternative="greater").pvalue, rtol=1e-9)
    chance = np.array([0.5, 0.2, 0.1, 0.25, 0.05])
    brute = [sum(np.prod([c if o else 1 - c for o, c in zip(out, chance)])
                 for out in itertools.product([0, 1], repeat=5) if sum(out) >= k) for k in range(6)]
    for k in range(6):
        np.testing.assert_allclose(top1_above_chance_p(np.arange(5) < k, chance), brute[k], rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        top1_above_chance_p(np.ones(3, bool), np.ones(4))


def test_learning_summary_needs_every_pair_type_clear_in_the_last_two_validations():
    from mammodg.stages.contrastive import learning_summary

    def h(style_p, view_p):
        return {"global": {"multi_style_top1_p": style_p, "multi_view_top1_p": view_p}}

    assert learning_summary([h(0.5, 0.5), h(1e-4, 1e-3), h(1e-5, 0.009)], "msvcl").endswith("multi_style yes, multi_view yes")
    assert learning_summary([h(1e-4, 0.02), h(1e-5, 1e-5)], "msvcl").endswith("multi_style yes, multi_view NO")
    assert "fewer than 2 validations" in learning_summary([h(1e-5, 1e-5)], "msvcl")


def test_validation_has_at_least_32_breasts_or_all():
    from mammodg.stages.contrastive import validation_size

    cfg = TrainConfig(stage="contrastive", batch_size=4)
    assert validation_size(cfg, 100) == 32 and validation_size(cfg, 12) == 12
    cfg.batch_size = 64
    assert validation_size(cfg, 100) == 64 and validation_size(cfg, 40) == 40


def test_contrastive_stage_end_to_end_export_and_resume(tiny_records, pairs, tmp_path):
    from mammodg.cli import main

    out, _ = pairs
    run = tmp_path / "run"
    args = ["train", "--stage", "contrastive", "--set", f"data_dir={tiny_records}", "--set", f"run_dir={run}",
            "--set", f"contrastive.pairs_dir={out}", "--set", "contrastive.method=msvcl",
            "--set", "contrastive.input_size=[32,32]", "--set", "contrastive.hidden_dim=32",
            "--set", "contrastive.pair_size=[]", "--set", "contrastive.crop_scale=[0.5,1.0]",
            "--set", "batch_size=4", "--set", "steps=4", "--set", "val_every=2", "--set", "strategy=natural",
            "--set", "val_max_batches=2"]
    assert main(args) == 0
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4] and all(np.isfinite(h["global"]["nt_xent"]) for h in history)
    for kind in ("multi_style", "multi_view"):  # each pair type with its chance level beside it
        assert all(0 <= h["global"][f"{kind}_top1"] <= 1 and 0 < h["global"][f"{kind}_top1_chance"] <= 1 for h in history)
        assert all(0 < h["global"][f"{kind}_top1_p"] <= 1 for h in history)
    assert (run / "backbone.weights.h5").is_file() and (run / "saved_model" / "saved_model.pb").is_file()
    # the SavedModel, reloaded in a fresh process, gives the Keras backbone's embeddings
    x = np.random.default_rng(0).uniform(size=(3, 32, 32, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({str(run / 'saved_model')!r})
        np.save({str(tmp_path / 'y.npy')!r}, m.serve(tf.constant(np.load({str(tmp_path / 'x.npy')!r}))).numpy())
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    from mammodg.config import load
    from mammodg.models.resnet import build_backbone

    cfg = load(TrainConfig, run / "config.yaml")  # the demo config's encoder, with the --set values
    from mammodg.stages.contrastive import validation_batches

    _, size, count = validation_batches(cfg)  # anchors: 2 per breast of the validation batches seen (at most 2)
    assert all(h["global"][f"{k}_anchors"] == 2 * size * min(2, count // size)
               for h in history for k in ("multi_style", "multi_view"))
    backbone = build_backbone(cfg.contrastive.backbone, (32, 32, 1), width=cfg.contrastive.width)
    backbone.load_weights(run / "backbone.weights.h5")
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), backbone.predict(x, verbose=0), atol=1e-5)
    assert main(args) == 0  # a finished run is not retrained
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [2, 4]
    assert main(["evaluate", "--stage", "contrastive", "--run", str(run), "--split", "train"]) == 0
    inv = json.loads((run / "invariance_train" / "invariance.json").read_text())
    assert set(inv["images_per_style"]) == set(load_index(tiny_records)["segments"])
    for key in ("probe_trained", "probe_projection", "probe_random_init", "probe_random_init_data_bn"):
        assert 0.0 <= inv[key]["accuracy"] <= 1.0 and inv[key]["images"] == sum(inv["images_per_style"].values())
    assert (run / "invariance_train" / "tsne.png").stat().st_size > 10_000
    from mammodg.evaluate import evaluate_contrastive, projection_encoder
    from mammodg.models.resnet import view_names
    from mammodg.stages.contrastive import contrastive_task

    # the probed head output is what the trained model fed NT-Xent: every view's projection of the same tiles
    full = contrastive_task(cfg).build_model()
    full.load_weights(run / "best.weights.h5")
    tiles = np.random.default_rng(1).uniform(size=(3, *cfg.contrastive.input_size, 1)).astype(np.float32)
    z = full.predict({k: tiles for k in view_names(full.output.shape[1])}, verbose=0)
    head = projection_encoder(cfg, run / "best.weights.h5").predict(tiles, verbose=0)
    for v in range(z.shape[1]):
        np.testing.assert_allclose(head, z[:, v], atol=1e-4)

    alone = evaluate_contrastive(run, split="train", baselines=False)  # the experiment's later methods of a seed
    assert alone["style_accuracy"] == round(inv["probe_trained"]["accuracy"], 4) and "style_accuracy_random_init" not in alone
    assert set(json.loads(alone["json"].read_text())) & {"probe_random_init", "probe_random_init_data_bn"} == set()


def test_linear_probe_sees_style_only_when_embeddings_carry_it():
    from mammodg.evaluate import linear_probe_accuracy

    rng = np.random.default_rng(0)
    styles = np.repeat(np.array(["A", "B", "C"]), 40)
    noise = rng.normal(size=(120, 16))
    carrying = noise + 6 * np.eye(16)[np.repeat([0, 1, 2], 40)]
    assert linear_probe_accuracy(carrying, styles)["accuracy"] > 0.95
    blind = linear_probe_accuracy(noise, styles)
    assert blind["accuracy"] < 0.55 and blind["chance"] == pytest.approx(1 / 3)
    lone = linear_probe_accuracy(noise[:81], np.append(styles[:80], "D"))  # a style with 1 image is dropped
    assert lone["dropped_styles"] == ["D"] and lone["images"] == 80


def test_probe_folds_keep_each_patient_in_one_fold():
    """GroupKFold by patient: a patient's images (here 2 to 4 each, of one or several styles) are all on
    one side of every split, every image is tested once, and the styles stay in every training part."""
    from mammodg.evaluate import linear_probe_accuracy, probe_folds

    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(30), rng.integers(2, 5, 30))
    styles = np.array(["A", "B", "C"])[(patients + rng.integers(0, 2, len(patients))) % 3]
    folds = probe_folds(styles, patients, seed=0)
    assert len(folds) == 5
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(patients)))
    for train, test in folds:
        assert not set(patients[train]) & set(patients[test])
        assert set(styles[train]) == {"A", "B", "C"}
    # a patient-specific embedding (no style in it) gives a style probe at chance when grouped
    feats = rng.normal(size=(30, 16))[patients] + 0.05 * rng.normal(size=(len(patients), 16))
    assert linear_probe_accuracy(feats, styles, patients)["accuracy"] < 0.6


def test_optimizer_choice_and_peak_rate():
    import keras

    from mammodg.optimizers import contrastive_optimizer

    def rate(opt, step):
        opt.iterations.assign(step)
        return float(opt.learning_rate)

    args = dict(learning_rate=0.3, batch_size=64, steps=100, warmup_steps=10)
    sgd = contrastive_optimizer("sgd", **args)()
    assert isinstance(sgd, keras.optimizers.SGD)
    assert rate(sgd, 10) == pytest.approx(0.3 * 64 / 256)  # SimCLR's linear scaling at the peak
    assert rate(sgd, 5) == pytest.approx(0.3 * 64 / 256 / 2)  # linear warm-up
    adamw = contrastive_optimizer("adamw", **(args | {"learning_rate": 1e-3}))(use_ema=True, ema_momentum=0.9)
    assert isinstance(adamw, keras.optimizers.AdamW) and rate(adamw, 10) == pytest.approx(1e-3)
    assert rate(adamw, 55) == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 45 / 90)))  # cosine
    assert rate(adamw, 100) < 1e-6 and adamw.use_ema  # decayed to 0 at the last step; EMA keywords passed on
    with pytest.raises(ValueError, match="optimizer must be one of"):
        contrastive_optimizer("lars", **args)


def test_missing_pairs_name_the_command_that_builds_them(tiny_records, tmp_path, capsys):
    from mammodg import stages
    from mammodg.cli import main

    cfg = TrainConfig(stage="contrastive", data_dir=str(tiny_records), run_dir=str(tmp_path / "run"))
    cfg.contrastive.pairs_dir = str(tmp_path / "pairs")
    with pytest.raises(FileNotFoundError, match=rf"dataset.json not found; build it with `mammodg build-pairs --data "
                                                 rf"{tiny_records} --out {tmp_path / 'pairs'} --cyclegan RUN`"):
        stages.run("contrastive", cfg)
    cfg.contrastive.method = "simclr"  # needs no style transfers
    with pytest.raises(FileNotFoundError, match=rf"--out {tmp_path / 'pairs'}`"):
        stages.run("contrastive", cfg)
    config = tmp_path / "own.yaml"  # an explicit config without the demo's orchestration
    config.write_text(f"data_dir: {tiny_records}\nrun_dir: {tmp_path / 'run'}\ncontrastive:\n  pairs_dir: {tmp_path / 'pairs'}\n")
    assert main(["train", "--stage", "contrastive", "--config", str(config)]) == 2
    assert "mammodg build-pairs" in capsys.readouterr().err
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "run").exists()


def test_demo_orchestration_builds_missing_pairs_once(tiny_records, tmp_path, capsys):
    from mammodg.demo import prepare_contrastive
    from mammodg.stages.contrastive import check_pairs

    cfg = TrainConfig(stage="contrastive", data_dir=str(tiny_records), run_dir=str(tmp_path / "run"))
    cfg.contrastive.method, cfg.contrastive.pairs_dir = "simclr", str(tmp_path / "pairs")
    assert prepare_contrastive(cfg) == tmp_path / "pairs" == check_pairs(cfg)
    assert load_index(tmp_path / "pairs")["kind"] == "pairs" and "breast records:" in capsys.readouterr().out
    stamp = (tmp_path / "pairs" / "dataset.json").stat().st_mtime_ns
    prepare_contrastive(cfg)  # present: not rebuilt
    assert (tmp_path / "pairs" / "dataset.json").stat().st_mtime_ns == stamp
    cfg.data_dir, cfg.contrastive.pairs_dir = str(tmp_path / "nodata"), str(tmp_path / "pairs2")
    with pytest.raises(FileNotFoundError, match="mammodg build-tfrecords"):
        prepare_contrastive(cfg)


@pytest.mark.parametrize("field, value", [("method", "byol"), ("optimizer", "lars"), ("overlap_shift", 1.5),
                                          ("overlap_shift", -0.1)])
def test_bad_contrastive_config_fails_before_any_data_work(tmp_path, field, value):
    from mammodg import stages
    from mammodg.config import ConfigError

    cfg = TrainConfig(stage="contrastive", data_dir=str(tmp_path / "missing"), run_dir=str(tmp_path / "run"))
    setattr(cfg.contrastive, field, value)
    with pytest.raises(ConfigError, match=f"contrastive.{field}"):  # not the missing data_dir, found later
        stages.run("contrastive", cfg)
    assert not (tmp_path / "run").exists()


def test_same_seed_gives_the_same_batches(tiny_records, pairs):
    """Stateless draws seeded by (seed, sample index): two pipelines of one config give identical batches
    (the patch stage's decoder too), another seed other ones."""
    from mammodg.stages.contrastive import contrastive_batches
    from mammodg.stages.patch import patch_batches

    def first(ds, n=2):
        return [tf.nest.map_structure(lambda t: t.numpy(), b) for b, _ in zip(ds, range(n))]

    def equal(a, b):
        return all(np.array_equal(x, y) for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)))

    cfg = TrainConfig(stage="contrastive", data_dir=str(tiny_records), batch_size=4, strategy="natural", seed=3)
    cfg.contrastive.pairs_dir, cfg.contrastive.input_size = str(pairs[0]), [16, 12]
    ref = first(contrastive_batches(cfg))
    assert equal(ref, first(contrastive_batches(cfg)))
    cfg.seed = 4
    assert not equal(ref, first(contrastive_batches(cfg)))
    pcfg = TrainConfig(stage="patch", data_dir=str(tiny_records), batch_size=4, seed=2)
    pcfg.patch.patch_size = 16
    ref = first(patch_batches(pcfg), 3)
    assert equal(ref, first(patch_batches(pcfg), 3))


def test_resnet18_backbone_shape():
    """ResNet-18 (He et al. 2016): 17 3x3/7x7 convolutions + 3 projection shortcuts, 8 x base features."""
    import keras

    from mammodg.models.resnet import build_backbone

    m = build_backbone("resnet18", (32, 24, 1), width=0.25)
    convs = [la for la in m.layers if isinstance(la, keras.layers.Conv2D)]
    assert len(convs) == 20 and sum(la.kernel_size == (1, 1) for la in convs) == 3
    assert m.output_shape == (None, 128) and convs[0].filters == 16
    assert m.predict(np.zeros((2, 32, 24, 1), np.float32), verbose=0).shape == (2, 128)
    with pytest.raises(ValueError, match="only for backbone resnet50"):
        build_backbone("resnet18", (32, 24, 1), weights="w.h5")
