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
from mammodg.stages.contrastive import (
    METHODS,
    augment,
    breast_point,
    choose,
    crop_box,
    crop_input,
    evaluation_tiles,
    pair_decoder,
    positive_pairs,
    views_per_sample,
)


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


def _style_weights(d, side, n=3):
    """Each style's share of one side of a draw (eq. 2)."""
    w = np.zeros(n)
    w[d[f"style{side}_a"]] += 1 - d[f"alpha{side}"]
    w[d[f"style{side}_b"]] += d[f"alpha{side}"]
    return w


@pytest.mark.parametrize("method", METHODS)
def test_choose_follows_each_methods_definition(method):
    k = views_per_sample(method)
    draws = [{key: v.numpy() for key, v in choose(tf.constant(2), tf.constant(3), method, tf.constant([7, i], tf.int64)).items()}
             for i in range(200)]
    assert all(f"view{k}" in d and f"view{k + 1}" not in d for d in draws)
    # MSVCL (section III-B): both losses, a multi-style pair and a multi-view pair sharing the CC anchor
    assert positive_pairs(method) == (((0, 1), (0, 2)) if method == "msvcl" else ((0, 1),))
    for i, j in positive_pairs(method):
        views = np.array([(d[f"view{i + 1}"], d[f"view{j + 1}"]) for d in draws])
        multi_view = method == "mvcl" or (method == "msvcl" and j == 2)
        if multi_view:  # CC with MLO of the same breast
            assert (views == [0, 1]).all()
        elif method == "msvcl":  # the anchor CC in another style
            assert (views == 0).all()
        else:  # the same image twice, any view
            assert (views[:, 0] == views[:, 1]).all() and set(views[:, 0]) == {0, 1}
        if method in ("mscl", "msvcl"):  # two different styles of the source: one pure, one blend
            w1 = np.array([_style_weights(d, i + 1) for d in draws])
            w2 = np.array([_style_weights(d, j + 1) for d in draws])
            pure1, pure2 = w1.max(1) == 1, w2.max(1) == 1
            assert (pure1 | pure2).all() and min((pure1 & ~pure2).mean(), (pure2 & ~pure1).mean()) > 0.15  # either side
            pure, blend = np.where(pure1[:, None], w1, w2), np.where(pure1[:, None], w2, w1)
            share = (pure * blend).sum(1)  # the pure side's style in the other side
            assert share.max() <= 0.5 + 1e-6 and (share == 0).mean() > 0.4
            assert 0.5 * np.abs(w1 - w2).sum(1).min() >= 0.5 - 1e-6  # total variation: never the same style
            assert set(pure.argmax(1)) == {0, 1, 2} and set(blend.argmax(1)) == {0, 1, 2}
            alphas = np.array([(d[f"alpha{i + 1}"], d[f"alpha{j + 1}"]) for d in draws])
            assert set(np.round(alphas.ravel() * 10).astype(int)) == set(range(6))  # with a <-> b: all of eq. 2's blends
        else:
            assert all(d[f"style{s}_{x}"] == 0 and d[f"alpha{s}"] == 0 for d in draws for s in (i + 1, j + 1) for x in "ab")
    if method == "msvcl":  # the two partners of the anchor are drawn independently
        w2 = np.array([_style_weights(d, 2) for d in draws])
        w3 = np.array([_style_weights(d, 3) for d in draws])
        assert (np.abs(w2 - w3).sum(1) > 0).mean() > 0.3
    one_view = choose(tf.constant(1), tf.constant(1), method, tf.constant([1, 2], tf.int64))
    assert all(int(one_view[f"view{s}"]) == 0 for s in range(1, k + 1))


def _cfg(**contrastive):
    cfg = TrainConfig(stage="contrastive", batch_size=4)
    for k, v in contrastive.items():
        setattr(cfg.contrastive, k, v)
    return cfg


def _recording(monkeypatch, name):
    """Replace ``mammodg.stages.contrastive.<name>`` by a wrapper recording (args, result) of each call."""
    import mammodg.stages.contrastive as stage

    calls, real = [], getattr(stage, name)

    def wrapper(*args, **kwargs):
        calls.append((args, real(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(stage, name, wrapper)
    return calls


def test_decoder_renders_the_chosen_styles_and_views(pairs, monkeypatch):
    """With augmentation off, each side is exactly model_input of the chosen blend (maybe mirrored)."""
    out, styles = pairs
    cfg = _cfg(method="msvcl", rotation_deg=0.0, crop_scale=[1.0, 1.0], jitter=0.0, input_size=[64, 48])
    raws = list(tf.data.TFRecordDataset(sorted(all_shards(load_index(out), out, "train"))).take(6))
    chosen = _recording(monkeypatch, "choose")
    decode = pair_decoder(cfg)
    for i, raw in enumerate(raws):
        views, _ = decode(tf.constant(i, tf.int64), raw)
        assert sorted(views) == ["view1", "view2", "view3"]
        r = parse_pair(raw)
        c = chosen[-1][1]
        n_styles = int(tf.size(r["styles"]))
        for side in ("1", "2", "3"):
            v = int(c[f"view{side}"])
            a, b, alpha = int(c[f"style{side}_a"]), int(c[f"style{side}_b"]), float(c[f"alpha{side}"])
            img = [tf.io.decode_png(r["images"][v * n_styles + k], dtype=tf.uint16).numpy().astype(np.float32) for k in (a, b)]
            ref = model_input(img[0] * (1 - alpha) + img[1] * alpha, cfg.target_mean).numpy()
            got = views[f"view{side}"].numpy()
            err = min(np.abs(got - ref).max(), np.abs(got - ref[:, ::-1]).max())
            assert err < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_crops_of_one_view_share_a_breast_point(pairs, monkeypatch, method):
    """crop_overlap: the sides showing the same view of the breast are cropped around one breast point
    (every style of a view has the same mask); sides of different views, or crop_overlap off, not."""
    out, _ = pairs
    raws = list(tf.data.TFRecordDataset(sorted(all_shards(load_index(out), out, "train"))).take(8))
    chosen, crops = _recording(monkeypatch, "choose"), _recording(monkeypatch, "augment")
    shared = 0
    for overlap in (True, False):
        decode = pair_decoder(_cfg(method=method, crop_overlap=overlap, input_size=[16, 12]))
        for i, raw in enumerate(raws):
            crops.clear()
            decode(tf.constant(i, tf.int64), raw)
            c = chosen[-1][1]
            k = views_per_sample(method)
            assert len(crops) == k
            points = [args[3] if len(args) > 3 else None for args, _ in crops]
            if not overlap:
                assert all(p is None for p in points)
                continue
            for (img, *_), p in zip((args for args, _ in crops), points):
                h, w = img.shape[:2]
                assert img[int(p[0] * h), int(p[1] * w), 0] >= 1.0  # a breast pixel
            for s in range(k):
                for t in range(s + 1, k):
                    same_view = int(c[f"view{s + 1}"]) == int(c[f"view{t + 1}"])
                    assert np.array_equal(points[s].numpy(), points[t].numpy()) == same_view
                    shared += same_view
    assert shared >= (0 if method == "mvcl" else len(raws))


def test_crop_box_contains_the_shared_point_and_independent_crops_rarely_overlap():
    cfg = _cfg(crop_scale=[0.02, 0.04], rotation_deg=10.0)
    image = tf.constant(_left_breast(200, 150, cols=100)[..., None].astype(np.float32))  # 2/3 of the image is breast

    def overlap(b1, b2):
        return min(b1[2], b2[2]) > max(b1[0], b2[0]) and min(b1[3], b2[3]) > max(b1[1], b2[1])

    together = independent = 0
    for i in range(100):
        p = breast_point(image, tf.constant([3, i], tf.int64)).numpy()
        boxes = []
        for side in (0, 1):
            box, angle = crop_box(image, tf.constant([side, i], tf.int64), cfg, tf.constant(p))
            box = box.numpy()
            assert box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]
            assert box.min() >= 0.0 and box.max() <= 1.0 + 1e-6 and abs(float(angle)) <= np.radians(10.0) + 1e-6
            area = (box[2] - box[0]) * (box[3] - box[1])
            assert 0.02 - 1e-6 <= area <= 0.04 + 1e-6
            boxes.append(box)
        together += overlap(*boxes)
        independent += overlap(*(crop_box(image, tf.constant([side, i], tf.int64), cfg)[0].numpy() for side in (0, 1)))
    assert together == 100 and independent < 30


def test_augment_keeps_shape_and_varies_by_seed(pairs):
    out, _ = pairs
    cfg = _cfg(input_size=[40, 32])
    raw = next(iter(tf.data.TFRecordDataset(sorted(all_shards(load_index(out), out, "train")))))
    img = tf.cast(tf.io.decode_png(parse_pair(raw)["images"][0], dtype=tf.uint16), tf.float32)
    xs = [augment(img, tf.constant([0, i], tf.int64), cfg).numpy() for i in range(4)]
    assert all(x.shape == (40, 32, 1) and np.isfinite(x).all() for x in xs)
    assert min(np.abs(a - b).mean() for a, b in zip(xs, xs[1:])) > 1e-3
    np.testing.assert_array_equal(xs[0], augment(img, tf.constant([0, 0], tf.int64), cfg).numpy())  # seeded


def _left_breast(h=64, w=48, cols=None):
    """A stored image whose breast is the left ``cols`` columns, values a smooth ramp in (0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w]
    v = (0.2 + 0.6 * yy / h + 0.1 * xx / w).astype(np.float32)
    return to_stored(v, xx < (w // 2 if cols is None else cols))


def test_augment_crops_hold_breast_and_keep_the_whole_image_outside_constant():
    cfg = _cfg(input_size=[16, 12], crop_scale=[0.02, 0.03], rotation_deg=0.0, jitter=0.0)
    stored = _left_breast(200, 150, cols=15)  # the breast is the left 10% of the image
    image = tf.constant(stored[..., None].astype(np.float32))
    fill = float(model_input(image, cfg.target_mean).numpy()[0, -1, 0])  # the whole image's outside constant
    crops = np.stack([augment(image, tf.constant([1, i], tf.int64), cfg).numpy() for i in range(40)])
    breast = crops > fill + 1e-3
    assert breast.reshape(40, -1).any(axis=1).all()  # every crop is centred on breast (random ones: ~1 in 10)
    assert crops.min() >= min(fill, 0.0) - 1e-4  # no crop-own constant (far below 0 for a mostly-breast crop)


def test_crop_input_rotates_about_the_box_centre():
    rng = np.random.default_rng(0)
    stored = to_stored(rng.uniform(0.1, 0.9, (33, 33)).astype(np.float32), np.ones((33, 33), bool))
    image = tf.constant(stored[..., None].astype(np.float32))
    cfg = _cfg(input_size=[33, 33])
    ref = model_input(image, cfg.target_mean).numpy()[..., 0]
    same, quarter = crop_input(image, [[0.0, 0.0, 1.0, 1.0]] * 2, cfg, [0.0, np.pi / 2]).numpy()[..., 0]
    np.testing.assert_allclose(same, ref, atol=1e-5)  # the whole image, unrotated: itself
    np.testing.assert_allclose(quarter, np.rot90(ref), atol=1e-4)  # output (i, j) samples input (j, n - 1 - i)
    # a box of the top-left quarter at 2x: every other output pixel is an input pixel
    zoom = crop_input(image, [[0.0, 0.0, 0.5, 0.5]], _cfg(input_size=[33, 33]), [0.0]).numpy()[0, ::2, ::2, 0]
    np.testing.assert_allclose(zoom, ref[:17, :17], atol=1e-5)


def test_evaluation_tiles_cover_the_breast_at_the_training_scale():
    cfg = _cfg(input_size=[32, 24], crop_scale=[0.25, 0.25])  # tile side = sqrt(0.25) = half of each side
    stored = _left_breast()  # 64x48, the left half is breast: of the 2x2 grid the two left tiles are kept
    tiles = evaluation_tiles(stored, cfg)
    assert tiles.shape == (2, 32, 24, 1)
    v, mask = from_stored(stored)
    ref = np.where(mask, v, float(model_input(tf.constant(stored[..., None]), cfg.target_mean).numpy()[0, -1, 0]))
    # crop_and_resize samples [y0 (h - 1), y1 (h - 1)]: nearly pixel-aligned here, but its last column
    # (x = 23.5) blends the breast edge with the outside
    for tile, (r, c) in zip(tiles[..., 0], [(0, 0), (32, 0)]):
        np.testing.assert_allclose(tile[:, :-1], ref[r:r + 32, c:c + 23], atol=0.01)
    cfg.contrastive.pair_size = [32, 24]  # resized to the pair records' size first: same grid, half the pixels
    assert evaluation_tiles(stored, cfg).shape == (2, 32, 24, 1)
    no_breast = np.zeros_like(stored)
    no_breast[:4, -4:] = stored[:4, :4]  # a sliver of breast in the top-right tile only: that tile is kept
    assert np.allclose(evaluation_tiles(no_breast, _cfg(input_size=[32, 24], crop_scale=[0.25, 0.25]))[0, :2, -2:, 0],
                       from_stored(stored)[0][:2, :2], atol=0.05)


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
    from mammodg.models.resnet import resnet50_backbone

    backbone = resnet50_backbone((32, 32, 1))
    backbone.load_weights(run / "backbone.weights.h5")
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), backbone.predict(x, verbose=0), atol=1e-5)
    assert main(args) == 0  # a finished run is not retrained
    assert [h["step"] for h in json.loads((run / "history.json").read_text())] == [2, 4]
    assert main(["evaluate", "--stage", "contrastive", "--run", str(run), "--split", "train"]) == 0
    inv = json.loads((run / "invariance_train" / "invariance.json").read_text())
    assert set(inv["images_per_style"]) == set(load_index(tiny_records)["segments"])
    for key in ("probe_trained", "probe_random_init", "probe_random_init_data_bn"):
        assert 0.0 <= inv[key]["accuracy"] <= 1.0 and inv[key]["images"] == sum(inv["images_per_style"].values())
    assert (run / "invariance_train" / "tsne.png").stat().st_size > 10_000


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


def test_optimizer_choice_and_peak_rate():
    import keras

    from mammodg.config import ConfigError
    from mammodg.stages.contrastive import _optimizer

    cfg = TrainConfig(stage="contrastive", batch_size=64, steps=100, learning_rate=0.3)
    cfg.contrastive.warmup_steps = 10
    sgd = _optimizer(cfg)()
    assert isinstance(sgd, keras.optimizers.SGD)
    assert float(sgd._learning_rate(10)) == pytest.approx(0.3 * 64 / 256)  # SimCLR's linear scaling at the peak
    cfg.contrastive.optimizer, cfg.learning_rate = "adamw", 1e-3
    adamw = _optimizer(cfg)()
    assert isinstance(adamw, keras.optimizers.AdamW) and float(adamw._learning_rate(10)) == pytest.approx(1e-3)
    assert float(adamw._learning_rate(100)) < 1e-6  # cosine decay to 0 at the last step
    cfg.contrastive.optimizer = "lars"
    with pytest.raises(ConfigError, match="contrastive.optimizer"):
        _optimizer(cfg)


@pytest.mark.parametrize("field, value", [("method", "byol"), ("optimizer", "lars")])
def test_bad_contrastive_config_fails_before_any_data_work(tmp_path, field, value):
    from mammodg import stages
    from mammodg.config import ConfigError

    cfg = TrainConfig(stage="contrastive", data_dir=str(tmp_path / "missing"), run_dir=str(tmp_path / "run"))
    setattr(cfg.contrastive, field, value)
    with pytest.raises(ConfigError, match=f"contrastive.{field}"):  # not the missing data_dir, found later
        stages.run("contrastive", cfg)
    assert not (tmp_path / "run").exists()
