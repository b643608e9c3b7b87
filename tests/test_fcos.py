"""FCOS (MSVCL v2 section III-C): targets worked out by hand, decoding of exactly encoded boxes, losses against
numpy, 2 replicas against 1 device, config round trips and a tiny training run."""
import math
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from mammodg import models
from mammodg.losses import FCOSLoss, fcos_loss_terms, giou, sigmoid_focal_loss
from mammodg.models.fcos import FCOSHead, FPN, Scale, decode_detections, fcos_model, to_stored_pixels
from mammodg.models.fcos_targets import fcos_targets, level_shapes, locations, regression_ranges, strides_of

INF = math.inf
P2_ON = (2, 3, 4, 5, 6, 7)


def tiny(levels=(3, 4, 5, 6, 7), size=64, classes=1):
    return fcos_model(input_shape=(size, size, 1), num_classes=classes, levels=levels, backbone="tiny", width=8,
                      tower_convs=1, groups=2, backbone_width=8)


def np_targets(boxes, classes, shapes, strides, ranges, radius=1.5):
    out = fcos_targets(np.asarray(boxes, np.float32), np.asarray(classes, np.int32), shapes, strides, ranges, radius)
    return {k: keras.ops.convert_to_numpy(v) for k, v in out.items()}


# --- targets ---------------------------------------------------------------------------------------------------------

def test_regression_range_table():
    assert regression_ranges() == [(0, 64), (64, 128), (128, 256), (256, 512), (512, INF)]
    assert regression_ranges(P2_ON) == [(0, 32), (32, 64), (64, 128), (128, 256), (256, 512), (512, INF)]
    assert strides_of(P2_ON) == [4, 8, 16, 32, 64, 128]
    assert level_shapes((100, 64)) == [(13, 8), (7, 4), (4, 2), (2, 1), (1, 1)]
    with pytest.raises(ValueError, match="detection.levels"):
        regression_ranges((3, 5, 6))


def test_targets_by_hand_two_levels_smallest_area_wins():
    """16x16 image, strides 4 and 8, ranges (0, 8] and (8, inf). Box A (0,0,8,8) class 0, box B (0,0,14,14)
    class 1, a padding row and a zero-width box; the second image has no box.

    Stride 4 (x, y in 2, 6, 10, 14): A's centre region (radius 6) is all of A, so (2,2), (6,2), (2,6), (6,6)
    are A's with max distance 6 <= 8 and centerness sqrt(2/6 * 2/6) = 1/3. B's centre region is (1,1)-(13,13);
    only (6,6) has max(6, 6, 8, 8) = 8 <= 8, and there A (area 64) beats B (area 196).
    Stride 8 (x, y in 4, 12): A's (4,4) has max 4, not in (8, inf); B's four locations have max 10, 12, 12, 12:
    (4,4) ltrb (4,4,10,10) centerness 0.4; (12,4) (12,4,2,10) and (4,12) (4,12,10,2): sqrt(1/15); (12,12)
    (12,12,2,2): 1/6.
    """
    boxes = [[[0, 0, 8, 8], [0, 0, 14, 14], [0, 0, 0, 0], [10, 2, 10, 12]], [[0, 0, 0, 0]] * 4]
    classes = [[0, 1, -1, 0], [-1] * 4]
    t = np_targets(boxes, classes, [(4, 4), (2, 2)], [4, 8], [(0, 8), (8, INF)])
    labels = np.full((2, 20), -1)
    ltrb = np.zeros((2, 20, 4))
    ctr = np.zeros((2, 20))
    for i, d, c in [(0, (2, 2, 6, 6), 1 / 3), (1, (6, 2, 2, 6), 1 / 3), (4, (2, 6, 6, 2), 1 / 3),
                    (5, (6, 6, 2, 2), 1 / 3)]:
        labels[0, i], ltrb[0, i], ctr[0, i] = 0, d, c
    for i, d, c in [(16, (4, 4, 10, 10), 0.4), (17, (12, 4, 2, 10), math.sqrt(1 / 15)),
                    (18, (4, 12, 10, 2), math.sqrt(1 / 15)), (19, (12, 12, 2, 2), 1 / 6)]:
        labels[0, i], ltrb[0, i], ctr[0, i] = 1, d, c
    np.testing.assert_array_equal(t["labels"], labels)
    np.testing.assert_allclose(t["ltrb"], ltrb, atol=1e-6)
    np.testing.assert_allclose(t["centerness"], ctr, atol=1e-6)


def test_centre_sampling_radius_by_hand():
    """Box (0,0,16,16), one level of stride 4: the 1.5-stride centre region (2,2)-(14,14) holds only the 4
    locations at 6 and 10 (ltrb at (6,6) = (6,6,10,10), centerness 0.6 everywhere); a huge radius takes all 16."""
    args = ([[[0, 0, 16, 16]]], [[0]], [(4, 4)], [4], [(0, INF)])
    t = np_targets(*args)
    assert set(np.flatnonzero(t["labels"][0] == 0)) == {5, 6, 9, 10}
    np.testing.assert_allclose(t["ltrb"][0, 5], [6, 6, 10, 10])
    np.testing.assert_allclose(t["centerness"][0, [5, 6, 9, 10]], 0.6, atol=1e-6)
    assert (np_targets(*args, radius=10)["labels"] == 0).all()


def test_box_outside_every_range_has_no_positive():
    """Box (4,4,8,8): its only inner location (6,6) has max distance 2, below (8, 16] and (16, inf)."""
    args = ([[[4, 4, 8, 8]]], [[0]], [(4, 4), (2, 2)], [4, 8])
    assert (np_targets(*args, [(8, 16), (16, INF)])["labels"] == -1).all()
    t = np_targets(*args, [(0, 16), (16, INF)])
    assert list(np.flatnonzero(t["labels"][0] >= 0)) == [5]
    np.testing.assert_allclose(t["centerness"][0, 5], 1.0)


@pytest.mark.parametrize("levels", [(3, 4, 5, 6, 7), P2_ON])
def test_default_table_on_a_128_image(levels):
    """Box (0,0,100,100), centre (50,50). P3 (stride 8): centre region 38-62 holds x, y in 44, 52, 60, max
    distances 52-60, all in P3's range ((0,64] or with P2 (32,64]): 9 positives, (52,52) has ltrb (52,52,48,48)
    and centerness 48/52. P4 (stride 16): region 26-74 holds 40, 56, 72; only locations with a 72 have max
    72 in (64,128]: 5 positives. P5-P7 and P2 (P2's region 44-56 holds 46, 50, 54, max >= 46 > 32): none."""
    shapes, strides = level_shapes((128, 128), levels), strides_of(levels)
    t = np_targets([[[0, 0, 100, 100]]], [[0]], shapes, strides, regression_ranges(levels))
    loc = locations(shapes, strides)
    level = np.repeat(np.array(levels), [h * w for h, w in shapes])
    pos = t["labels"][0] == 0
    at = {lv: {tuple(p) for p in loc[pos & (level == lv)].astype(int)} for lv in levels}
    assert at[3] == {(x, y) for x in (44, 52, 60) for y in (44, 52, 60)}
    assert at[4] == {(72, 40), (72, 56), (72, 72), (40, 72), (56, 72)}
    assert all(not at[lv] for lv in levels if lv not in (3, 4))
    i = np.flatnonzero((loc == [52, 52]).all(axis=1) & (level == 3))[0]
    np.testing.assert_allclose(t["ltrb"][0, i], [52, 52, 48, 48])
    np.testing.assert_allclose(t["centerness"][0, i], 48 / 52, rtol=1e-6)


# --- decoding --------------------------------------------------------------------------------------------------------

def _encoded_outputs():
    """64x64 input, P3-P7, 2 classes. Location (20,20) encodes box (8,8,40,32) as class 0 (logit 5) and as class 1
    (logit 3); (28,20) encodes the same box as class 0 with logit 4 (a duplicate); (44,44) encodes (30,30,60,62)
    as class 1 (logit 4.5). Everything else scores sigmoid(-20)."""
    shapes, strides = level_shapes((64, 64)), strides_of()
    loc = locations(shapes, strides)
    n = len(loc)
    cls = np.full((1, n, 2), -20.0, np.float32)
    reg = np.ones((1, n, 4), np.float32)
    ctr = np.full((1, n), 5.0, np.float32)

    def put(xy, box, logits):
        i = np.flatnonzero((loc == xy).all(axis=1))[0]
        reg[0, i] = [xy[0] - box[0], xy[1] - box[1], box[2] - xy[0], box[3] - xy[1]]
        cls[0, i] = logits

    put((20, 20), (8, 8, 40, 32), (5, 3))
    put((28, 20), (8, 8, 40, 32), (4, -20))
    put((44, 44), (30, 30, 60, 62), (-20, 4.5))
    return {"classification": cls, "regression": reg, "centerness": ctr}


def test_decoder_returns_exactly_encoded_boxes_after_classwise_nms():
    out = {k: np.asarray(v) for k, v in decode_detections(_encoded_outputs(), (64, 64), max_detections=5).items()}
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert out["num_detections"].tolist() == [3]
    np.testing.assert_allclose(out["boxes"][0, :3], [[8, 8, 40, 32], [30, 30, 60, 62], [8, 8, 40, 32]], atol=1e-4)
    assert out["classes"][0, :3].tolist() == [0, 1, 1]
    expected = [sig(5), math.sqrt(sig(4.5) * sig(5)), math.sqrt(sig(3) * sig(5))]
    np.testing.assert_allclose(out["scores"][0, :3], expected, rtol=1e-5)
    assert (out["scores"][0, 3:] == 0).all() and out["boxes"].shape == (1, 5, 4)
    # the duplicate is only removed by NMS: without suppression (IoU threshold 1) it comes back
    loose = decode_detections(_encoded_outputs(), (64, 64), iou_threshold=1.0, max_detections=5)
    assert np.asarray(loose["num_detections"]).tolist() == [4]
    # top-k per level: with k = 1 only (20,20) survives on P3, as its two classes
    top1 = decode_detections(_encoded_outputs(), (64, 64), top_k=1, max_detections=5)
    assert np.asarray(top1["num_detections"]).tolist() == [2] and np.asarray(top1["classes"])[0, :2].tolist() == [0, 1]


def test_to_stored_pixels_inverts_the_resize():
    stored = np.array([[10.0, 20.0, 50.0, 80.0]], np.float32)
    scale, offset = (0.5, 0.25), (3.0, 7.0)
    model_input = stored * np.array(scale * 2) + np.array(offset * 2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(to_stored_pixels(model_input, scale, offset)), stored)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(to_stored_pixels(stored * 2, 2.0)), stored)


# --- losses ----------------------------------------------------------------------------------------------------------

def np_giou(a, b):
    def area(x):
        return max(x[2] - x[0], 0) * max(x[3] - x[1], 0)

    iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
    ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_giou_against_numpy_and_by_hand():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, size=(64, 2, 2))
    wh = rng.uniform(1, 30, size=(64, 2, 2))
    a, b = np.concatenate([xy[:, 0], xy[:, 0] + wh[:, 0]], 1), np.concatenate([xy[:, 1], xy[:, 1] + wh[:, 1]], 1)
    fixed = [((0, 0, 10, 10), (2, 2, 4, 4), 0.04), ((0, 0, 1, 1), (2, 2, 3, 3), -7 / 9), ((1, 2, 3, 5), (1, 2, 3, 5), 1)]
    a = np.concatenate([a, [f[0] for f in fixed]]).astype(np.float32)
    b = np.concatenate([b, [f[1] for f in fixed]]).astype(np.float32)
    got = keras.ops.convert_to_numpy(giou(a, b))
    np.testing.assert_allclose(got, [np_giou(p, q) for p, q in zip(a, b)], atol=1e-5)
    np.testing.assert_allclose(got[-3:], [f[2] for f in fixed], atol=1e-6)
    assert ((got >= -1) & (got <= 1)).all() and (got[:64] < 0).any()  # some random pairs are disjoint
    assert np.isfinite(keras.ops.convert_to_numpy(giou(np.zeros((2, 4)), np.zeros((2, 4))))).all()


def test_focal_loss_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, size=(4, 50, 3)).astype(np.float32)
    y = (rng.uniform(size=x.shape) < 0.2).astype(np.float32)
    p = 1 / (1 + np.exp(-x.astype(np.float64)))
    p_t = np.where(y == 1, p, 1 - p)
    ref = -np.where(y == 1, 0.25, 0.75) * (1 - p_t) ** 2 * np.log(p_t)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(sigmoid_focal_loss(y, x)), ref, rtol=1e-4, atol=1e-7)


def _random_outputs(rng, b, n, classes):
    return {"classification": rng.normal(-2, 2, size=(b, n, classes)).astype(np.float32),
            "regression": rng.uniform(1, 40, size=(b, n, 4)).astype(np.float32),
            "centerness": rng.normal(0, 2, size=(b, n)).astype(np.float32)}


def test_fcos_loss_terms_against_numpy():
    """Each term recomputed in numpy from the targets (checked above) and the model outputs."""
    rng = np.random.default_rng(2)
    loss = FCOSLoss((64, 64), num_classes=2)
    y = {"boxes": np.array([[[4, 6, 40, 30], [20, 20, 60, 62]], [[0, 0, 0, 0]] * 2], np.float32),
         "classes": np.array([[0, 1], [-1, -1]])}
    out = _random_outputs(rng, 2, 86, 2)
    got = {k: float(v) for k, v in loss(y, out).items()}
    t = {k: keras.ops.convert_to_numpy(v) for k, v in loss.targets(y).items()}
    pos = t["labels"] >= 0
    assert pos.sum() > 2
    onehot = np.eye(2)[np.maximum(t["labels"], 0)] * pos[..., None]
    cls = keras.ops.convert_to_numpy(sigmoid_focal_loss(onehot, out["classification"])).sum() / pos.sum()
    loc = locations(level_shapes((64, 64)), strides_of())
    to_box = lambda d: np.concatenate([loc - d[:, :2], loc + d[:, 2:]], 1)  # noqa: E731
    g = np.array([np_giou(p, q) for p, q in zip(to_box(out["regression"][0])[pos[0]], to_box(t["ltrb"][0])[pos[0]])])
    w = t["centerness"][0][pos[0]]
    box = ((1 - g) * w).sum() / w.sum()
    z, c = out["centerness"][pos].astype(np.float64), t["centerness"][pos]
    ctr = -(c * np.log(1 / (1 + np.exp(-z))) + (1 - c) * np.log(1 - 1 / (1 + np.exp(-z)))).sum() / pos.sum()
    assert got["classification"] == pytest.approx(cls, rel=1e-4)
    assert got["box"] == pytest.approx(box, rel=1e-4)
    assert got["centerness"] == pytest.approx(ctr, rel=1e-4)
    assert got["total"] == pytest.approx(cls + box + ctr, rel=1e-4)


@pytest.mark.parametrize("case", ["no boxes", "no box slots", "degenerate box"])
def test_losses_and_gradients_finite_without_positives(case):
    import tensorflow as tf

    model = tiny()
    boxes = {"no boxes": np.zeros((2, 3, 4)), "no box slots": np.zeros((2, 0, 4)),
             "degenerate box": np.array([[[10, 10, 10, 40]], [[5, 20, 30, 20]]])}[case].astype(np.float32)
    classes = np.full(boxes.shape[:2], -1 if case == "no boxes" else 0)
    loss = FCOSLoss((64, 64))
    x = np.random.default_rng(3).uniform(size=(2, 64, 64, 1)).astype(np.float32)
    with tf.GradientTape() as tape:
        terms = loss({"boxes": boxes, "classes": classes}, model(x, training=True))
    grads = tape.gradient(terms["total"], model.trainable_weights)
    assert all(np.isfinite(float(v)) for v in terms.values())
    assert float(terms["box"]) == 0 and float(terms["centerness"]) == 0 and float(terms["classification"]) > 0
    assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None)


def test_two_replicas_equal_one_device_on_the_global_batch():
    """Per-replica losses with the positive count all-reduced sum to the 1-device loss; gradients agree."""
    code = textwrap.dedent("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from mammodg.losses import FCOSLoss
        rng = np.random.default_rng(0)
        n = 86
        cls = rng.normal(-2, 2, size=(4, n, 1)).astype(np.float32)
        reg = rng.uniform(1, 40, size=(4, n, 4)).astype(np.float32)
        ctr = rng.normal(0, 2, size=(4, n)).astype(np.float32)
        boxes = np.zeros((4, 2, 4), np.float32); classes = -np.ones((4, 2), np.int32)
        boxes[0, 0], classes[0, 0] = [4, 6, 40, 30], 0       # replica 0: 1 box and an empty image
        boxes[2], classes[2] = [[20, 20, 60, 62], [2, 40, 20, 60]], 0   # replica 1: 2 boxes and an empty image
        w0 = rng.normal(0, 0.5, size=(n, 6)).astype(np.float32)
        def loss_and_grad(loss, w, c, r, z, b, k):
            with tf.GradientTape() as tape:
                out = {"classification": c + w[:, :1], "regression": r * tf.exp(w[:, 1:5]), "centerness": z + w[:, 5]}
                total = loss({"boxes": b, "classes": k}, out)["total"]
            return total, tape.gradient(total, w)
        w = tf.Variable(w0)
        single, g_single = loss_and_grad(FCOSLoss((64, 64)), w, cls, reg, ctr, boxes, classes)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            wm = tf.Variable(w0)
        replica_sum = lambda x: tf.distribute.get_replica_context().all_reduce("SUM", x)
        loss = FCOSLoss((64, 64), replica_sum=replica_sum)
        ds = tf.data.Dataset.from_tensor_slices((cls, reg, ctr, boxes, classes)).batch(4)
        batch = next(iter(strategy.experimental_distribute_dataset(ds)))
        per_replica = strategy.run(lambda *a: loss_and_grad(loss, wm, *a), args=batch)
        locals_ = [float(v) for v in strategy.experimental_local_results(per_replica[0])]
        total = strategy.reduce("SUM", per_replica[0], axis=None)
        grad = strategy.reduce("SUM", per_replica[1], axis=None)
        plain = FCOSLoss((64, 64))(  # replica 0's half without the all-reduce: a different normaliser
            {"boxes": boxes[:2], "classes": classes[:2]},
            {"classification": cls[:2] + w0[:, :1], "regression": reg[:2] * np.exp(w0[:, 1:5]),
             "centerness": ctr[:2] + w0[:, 5]})["total"]
        print("RESULT", strategy.num_replicas_in_sync, float(single), float(total),
              float(np.abs(grad - g_single).max()), locals_[0], float(plain))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    n_rep, single, total, grad_diff, replica0, plain0 = line[0].split()[1:]
    assert int(n_rep) == 2
    assert float(total) == pytest.approx(float(single), rel=1e-5)
    assert float(grad_diff) < 1e-5
    assert abs(float(replica0) - float(plain0)) > 1e-3  # the all-reduce changed replica 0's normaliser


# --- model -----------------------------------------------------------------------------------------------------------

def _same_after_rebuild(layer, inputs):
    a = keras.tree.flatten(layer(inputs))
    clone = layer.__class__.from_config(layer.get_config())
    clone(inputs)
    clone.set_weights(layer.get_weights())
    b = keras.tree.flatten(clone(inputs))
    assert len(a) == len(b) and all(np.allclose(keras.ops.convert_to_numpy(u), keras.ops.convert_to_numpy(v), atol=1e-6)
                                    for u, v in zip(a, b))


def test_layers_rebuild_from_config_with_identical_outputs():
    rng = np.random.default_rng(4)
    feats = {f"c{lv}": rng.normal(size=(2, h, w, 4)).astype(np.float32)
             for lv, (h, w) in zip((2, 3, 4, 5), level_shapes((64, 48), (2, 3, 4, 5)))}
    scale = Scale(0.5)
    scale(np.ones((2, 3), np.float32))
    scale.set_weights([np.float32(1.7)])
    _same_after_rebuild(scale, rng.normal(size=(2, 3)).astype(np.float32))
    fpn = FPN(P2_ON, width=8)
    _same_after_rebuild(fpn, feats)
    maps = fpn(feats)
    assert [tuple(m.shape[1:3]) for m in maps] == level_shapes((64, 48), P2_ON)
    head = FCOSHead(num_classes=2, levels=P2_ON, width=8, tower_convs=1, groups=4)
    _same_after_rebuild(head, maps)
    out = head(maps)
    n = sum(h * w for h, w in level_shapes((64, 48), P2_ON))
    assert tuple(out["classification"].shape) == (2, n, 2) and tuple(out["centerness"].shape) == (2, n)
    bias = head.cls_logits.bias.numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-bias)), 0.01, rtol=1e-5)  # prior pi = 0.01
    assert (keras.ops.convert_to_numpy(out["regression"]) > 0).all()
    restored = FCOSLoss.from_config(FCOSLoss((64, 48), 2, P2_ON).get_config())
    assert restored.ranges[0] == (0, 32) and restored.levels == P2_ON


def test_model_rebuilds_from_config_and_file_with_identical_outputs(tmp_path):
    model = models.build("fcos", input_shape=(64, 48, 1), backbone="tiny", levels=P2_ON, width=8, tower_convs=1,
                         groups=2)
    clone = keras.Model.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    model.save(tmp_path / "fcos.keras")
    loaded = keras.saving.load_model(tmp_path / "fcos.keras")
    x = np.random.default_rng(5).uniform(size=(1, 64, 48, 1)).astype(np.float32)
    a = model(x)
    for other in (clone, loaded):
        b = other(x)
        for k in a:
            np.testing.assert_allclose(keras.ops.convert_to_numpy(a[k]), keras.ops.convert_to_numpy(b[k]), atol=1e-6)
    assert a["regression"].shape[1] == len(locations(level_shapes((64, 48), P2_ON), strides_of(P2_ON)))


def test_resnet50_backbone_with_contrastive_weights(tmp_path):
    """The FPN reads the contrastive ResNet-50's C2-C5; a run's backbone.weights.h5 loads into it."""
    from mammodg.models.resnet import resnet50_backbone

    backbone = resnet50_backbone((64, 64, 1))
    path = tmp_path / "backbone.weights.h5"
    backbone.save_weights(path)
    model = fcos_model(input_shape=(64, 64, 1), levels=P2_ON, backbone_weights=str(path), width=8, tower_convs=1,
                       groups=2)
    features = model.get_layer("backbone_features")
    for name in ("conv1_conv", "conv5_block3_3_conv"):
        np.testing.assert_array_equal(features.get_layer(name).get_weights()[0], backbone.get_layer(name).get_weights()[0])
    assert [tuple(o.shape[1:]) for o in features.outputs] == [(16, 16, 256), (8, 8, 512), (4, 4, 1024), (2, 2, 2048)]
    out = model(np.zeros((1, 64, 64, 1), np.float32))
    assert out["regression"].shape[1] == sum(h * w for h, w in level_shapes((64, 64), P2_ON))
    with pytest.raises(FileNotFoundError, match="backbone.weights.h5"):
        fcos_model(input_shape=(64, 64, 1), backbone_weights=str(tmp_path / "missing.h5"))


def fit(detector, loss, x, y, epochs: int):
    """fit() of ``detector`` through a compute_loss override (Adam 3e-3, one batch of all images); the loss history."""

    class Trainable(keras.Model):
        def __init__(self):
            super().__init__()
            self.detector = detector

        def call(self, inputs):
            return self.detector(inputs)

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return loss(y, y_pred)["total"]

    model = Trainable()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    return model.fit(x, y, batch_size=len(x), epochs=epochs, verbose=0).history["loss"]


def test_tiny_training_reduces_the_loss():
    """fit() through a compute_loss override on 2 synthetic images with one bright square each."""
    keras.utils.set_random_seed(0)
    x = np.zeros((2, 64, 64, 1), np.float32)
    x[0, 10:30, 12:36] = 1
    x[1, 30:58, 26:50] = 1
    y = {"boxes": np.array([[[12, 10, 36, 30]], [[26, 30, 50, 58]]], np.float32), "classes": np.zeros((2, 1), np.int32)}
    detector, loss = tiny(), FCOSLoss((64, 64))
    history = fit(detector, loss, x, y, epochs=12)
    assert np.isfinite(history).all()
    assert history[-1] < 0.7 * history[0], history


def test_tiny_detector_overfits_its_training_images_to_ap50():
    """The detector learns its task: 4 synthetic images with one bright square each (16-27 px at 64x64), trained
    through the FCOS loss, then decoded (scores, NMS) and scored by pycocotools: AP@0.5 on them reaches >= 0.8.
    Guards the whole chain targets -> loss -> head init -> decoding -> evaluation box format."""
    from mammodg.metrics.detection import average_precision

    keras.utils.set_random_seed(0)
    rng, levels, n = np.random.default_rng(0), (3, 4, 5), 4
    x, boxes = np.zeros((n, 64, 64, 1), np.float32), []
    for i in range(n):
        s = int(rng.integers(16, 28))
        x0, y0 = (int(v) for v in rng.integers(0, 64 - s, size=2))
        x[i, y0:y0 + s, x0:x0 + s] = 1
        boxes.append([x0, y0, x0 + s, y0 + s])
    y = {"boxes": np.array(boxes, np.float32)[:, None], "classes": np.zeros((n, 1), np.int32)}
    detector = fcos_model(input_shape=(64, 64, 1), levels=levels, backbone="tiny", width=16, tower_convs=1, groups=4,
                          backbone_width=16)
    loss = FCOSLoss((64, 64), levels=levels)
    fit(detector, loss, x, y, epochs=60)
    det = decode_detections(detector(x, training=False), (64, 64), levels)
    ims = []
    for i in range(n):
        k = int(det["num_detections"][i])
        ims.append({"gt_boxes": np.array(boxes[i:i + 1], np.float32), "gt_classes": ["mass"],
                    "boxes": np.asarray(det["boxes"][i, :k]), "scores": np.asarray(det["scores"][i, :k]),
                    "classes": ["mass"] * k, "domain": "a", "image_id": str(i)})
    assert average_precision(ims, iou_thresholds=(0.5,))["ap50"] >= 0.8
