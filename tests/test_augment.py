"""Input operations (mammodg.augment): what each computes, and the same outputs eagerly and inside
``tf.data.Dataset.map`` (graph mode) for the same seed."""
import numpy as np
import pytest
import tensorflow as tf

from mammodg.augment import (
    METHODS,
    augment,
    breast_point,
    choose,
    crop_box,
    crop_input,
    evaluation_tiles,
    patch_decoder,
    pair_types,
    positive_pairs,
    styled,
    view_sides,
    views_per_sample,
)
from mammodg.io.manifest import LESION_CLASSES
from mammodg.preprocess.breast import from_stored, to_stored
from mammodg.records.reader import all_shards, load_index
from mammodg.records.schema import model_input, parse

TARGET_MEAN = 0.25


def _left_breast(h=64, w=48, cols=None):
    """A stored image whose breast is the left ``cols`` columns, values a smooth ramp in (0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w]
    v = (0.2 + 0.6 * yy / h + 0.1 * xx / w).astype(np.float32)
    return to_stored(v, xx < (w // 2 if cols is None else cols))


def _image(stored):
    return tf.constant(stored[..., None].astype(np.float32))


def _crop(**kw):
    return dict(dict(input_size=[16, 12], crop_scale=[0.1, 0.3], rotation_deg=10.0, jitter=0.2, target_mean=TARGET_MEAN), **kw)


def _assert_same_in_map(fn, n=4, atol=1e-6):
    """``fn(i)`` for i = 0..n-1 (i an int64 scalar tensor, e.g. the sample index of a seed) eagerly and as
    the map function of ``Dataset.range(n)`` (traced into a graph) give the same outputs."""
    eager = [fn(tf.constant(i, tf.int64)) for i in range(n)]
    mapped = list(tf.data.Dataset.range(n).map(fn))
    for e, m in zip(eager, mapped, strict=True):
        e, m = tf.nest.flatten(e), tf.nest.flatten(m)
        assert len(e) == len(m)
        for x, y in zip(e, m):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            if np.issubdtype(x.dtype, np.floating):
                np.testing.assert_allclose(y, x, atol=atol)
            else:
                np.testing.assert_array_equal(y, x)
    return eager


def _seed(a, i):
    return tf.stack([tf.constant(a, tf.int64), tf.cast(i, tf.int64)])


# ------------------------------------------------------------------------------------ eager == map
def test_breast_point_and_crop_box_are_the_same_in_map():
    image = _image(_left_breast(80, 60, cols=20))
    box = dict(crop_scale=[0.05, 0.2], rotation_deg=10.0)
    _assert_same_in_map(lambda i: breast_point(image, _seed(4, i)))
    _assert_same_in_map(lambda i: crop_box(image, _seed(4, i), **box))
    _assert_same_in_map(lambda i: crop_box(image, _seed(4, i), point=tf.constant([0.5, 0.1]), **box))


def test_crop_input_and_augment_are_the_same_in_map():
    image = _image(_left_breast(80, 60, cols=40))
    boxes = tf.constant([[0.1, 0.0, 0.6, 0.5], [0.0, 0.2, 1.0, 0.9]])
    _assert_same_in_map(lambda i: crop_input(image, boxes, input_size=[20, 15], target_mean=TARGET_MEAN,
                                             angles=tf.cast(i, tf.float32) * tf.constant([0.2, -0.1])), atol=1e-5)
    _assert_same_in_map(lambda i: augment(image, _seed(9, i), **_crop()), atol=1e-5)
    _assert_same_in_map(lambda i: augment(image, _seed(9, i), point=tf.constant([0.3, 0.2]), **_crop()), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_choose_and_styled_are_the_same_in_map(method):
    _assert_same_in_map(lambda i: choose(tf.constant(2), tf.constant(3), method, _seed(7, i)), n=10)
    rng = np.random.default_rng(0)
    pngs = tf.constant([tf.io.encode_png(rng.integers(0, 65535, (8, 6, 1)).astype(np.uint16)).numpy() for _ in range(6)])
    for a, b, alpha in ((0, 0, 0.0), (1, 2, 0.3), (2, 0, 0.5)):
        eager = _assert_same_in_map(lambda i: styled(pngs, 3, 1, a, b, alpha), n=1, atol=1e-3)[0]  # values up to 65535
        ref = [tf.io.decode_png(pngs[3 + k], dtype=tf.uint16).numpy().astype(np.float32) for k in (a, b)]
        np.testing.assert_allclose(eager.numpy(), ref[0] * (1 - alpha) + ref[1] * alpha, rtol=1e-6)  # view 1, eq. 2


# --------------------------------------------------------------------------------------- behaviour
def _assert_diversified(draws, sides, n=3):
    """Style diversification (MSVCL v2 III-B, eq. 2) on each side: ``a`` and ``b`` uniform over the n
    styles, ``alpha`` uniform over {0, 0.1, .., 1}, independently of each other and of the other side."""
    from scipy.stats import chisquare

    for side in sides:
        a = np.array([d[f"style{side}_a"] for d in draws])
        b = np.array([d[f"style{side}_b"] for d in draws])
        alpha = np.round(np.array([d[f"alpha{side}"] for d in draws]) * 10).astype(int)
        assert np.allclose(np.array([d[f"alpha{side}"] for d in draws]) * 10, alpha, atol=1e-5)
        for values, k in ((a, n), (b, n), (alpha, 11), (a * n + b, n * n)):  # (a, b) jointly uniform
            assert values.min() >= 0 and values.max() < k
            assert chisquare(np.bincount(values, minlength=k)).pvalue > 1e-3
    shares = [np.array([_style_weights(d, side, n) for d in draws]) for side in sides]
    assert np.allclose(shares[0].mean(0), 1 / n, atol=0.05)  # each style a third of the pixels on average
    assert np.abs(np.corrcoef(shares[0][:, 0], shares[1][:, 0])[0, 1]) < 0.15  # the two sides independent


def _style_weights(d, side, n=3):
    """Each style's share of one side of a draw (eq. 2)."""
    w = np.zeros(n)
    w[d[f"style{side}_a"]] += 1 - d[f"alpha{side}"]
    w[d[f"style{side}_b"]] += d[f"alpha{side}"]
    return w


@pytest.mark.parametrize("method", METHODS)
def test_choose_follows_each_methods_definition(method):
    k = views_per_sample(method)
    draws = [{key: v.numpy() for key, v in choose(tf.constant(2), tf.constant(3), method, _seed(7, i)).items()}
             for i in range(600)]
    assert all(f"view{k}" in d and f"view{k + 1}" not in d for d in draws)
    # MSVCL (section III-B): both losses, a multi-style pair (of the CC) and a multi-view pair (CC, MLO)
    assert positive_pairs(method) == (((0, 1), (2, 3)) if method == "msvcl" else ((0, 1),))
    for (i, j), kind in zip(positive_pairs(method), pair_types(method)):
        views = np.array([(d[f"view{i + 1}"], d[f"view{j + 1}"]) for d in draws])
        if kind == "multi_view":  # CC with MLO of the same breast, each style diversified (MVCL v2)
            assert (views == [0, 1]).all() and view_sides(method) == (i + 1, j + 1)
            _assert_diversified(draws, (i + 1, j + 1))
        elif method == "msvcl":  # the CC in two styles
            assert (views == 0).all()
        else:  # the same image twice, any view
            assert (views[:, 0] == views[:, 1]).all() and set(views[:, 0]) == {0, 1}
        if kind == "multi_style":  # two different styles of the source: one pure, one blend
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
        elif kind == "same_image":  # SimCLR: own style
            assert all(d[f"style{s}_{x}"] == 0 and d[f"alpha{s}"] == 0 for d in draws for s in (i + 1, j + 1) for x in "ab")
    one_view = choose(tf.constant(1), tf.constant(1), method, _seed(1, 2))
    assert all(int(one_view[f"view{s}"]) == 0 for s in range(1, k + 1))


def test_breast_point_is_a_uniform_breast_pixel():
    stored = _left_breast(40, 30, cols=6)
    points = np.array([breast_point(_image(stored), _seed(2, i)).numpy() for i in range(300)])
    pixels = np.floor(points * [40, 30] + 1e-4).astype(int)
    assert (stored[pixels[:, 0], pixels[:, 1]] > 0).all()  # always breast
    np.testing.assert_allclose(points * [40, 30], pixels, atol=1e-4)  # exactly a pixel's corner
    assert abs(pixels[:, 1].mean() - 2.5) < 0.3 and abs(pixels[:, 0].mean() - 19.5) < 2.0  # uniform over the 6 x 40
    uint16 = breast_point(tf.constant(stored[..., None]), _seed(2, 0)).numpy()  # the stored dtype works as well
    np.testing.assert_array_equal(uint16, points[0])
    nowhere = np.array([breast_point(_image(np.zeros((8, 8), np.uint16)), _seed(2, i)).numpy() for i in range(50)])
    assert nowhere.min() >= 0 and nowhere.max() < 1 and nowhere.std() > 0.1  # no breast: anywhere


def test_crop_box_contains_the_shared_point_and_independent_crops_rarely_overlap():
    image = _image(_left_breast(200, 150, cols=100))  # 2/3 of the image is breast
    args = dict(crop_scale=[0.02, 0.04], rotation_deg=10.0)

    def overlap(b1, b2):
        return min(b1[2], b2[2]) > max(b1[0], b2[0]) and min(b1[3], b2[3]) > max(b1[1], b2[1])

    together = independent = 0
    for i in range(100):
        p = breast_point(image, _seed(3, i)).numpy()
        boxes = []
        for side in (0, 1):
            box, angle = crop_box(image, _seed(side, i), point=tf.constant(p), **args)
            box = box.numpy()
            assert box[0] <= p[0] <= box[2] and box[1] <= p[1] <= box[3]
            assert box.min() >= 0.0 and box.max() <= 1.0 + 1e-6 and abs(float(angle)) <= np.radians(10.0) + 1e-6
            area = (box[2] - box[0]) * (box[3] - box[1])
            assert 0.02 - 1e-6 <= area <= 0.04 + 1e-6
            boxes.append(box)
        together += overlap(*boxes)
        independent += overlap(*(crop_box(image, _seed(side, i), **args)[0].numpy() for side in (0, 1)))
    assert together == 100 and independent < 30


def test_overlap_shift_keeps_crop_centres_near_the_shared_point():
    """shift s: a crop's centre lies within +/- s/2 of its sides from the shared point (unless clipped at
    the image edge), so two crops around one point share more of their area as s falls: the mean
    intersection over union against a direct numpy computation of the boxes' overlap."""
    image = _image(_left_breast(200, 150, cols=100))
    args = dict(crop_scale=[0.03, 0.03], rotation_deg=0.0)

    def iou(b1, b2):
        ih = max(0.0, min(b1[2], b2[2]) - max(b1[0], b2[0]))
        iw = max(0.0, min(b1[3], b2[3]) - max(b1[1], b2[1]))
        inter = ih * iw
        return inter / ((b1[2] - b1[0]) * (b1[3] - b1[1]) + (b2[2] - b2[0]) * (b2[3] - b2[1]) - inter)

    mean_iou = {}
    for shift in (1.0, 0.5, 0.0):
        ious = []
        for i in range(60):
            p = breast_point(image, _seed(3, i)).numpy()
            boxes = [crop_box(image, _seed(side, i), point=tf.constant(p), shift=shift, **args)[0].numpy()
                     for side in (0, 1)]
            for b in boxes:
                size, centre = b[2:] - b[:2], (b[:2] + b[2:]) / 2
                inside = (b[:2] > 1e-6) & (b[2:] < 1 - 1e-6)  # not clipped at the image edge
                assert np.all(np.abs(centre - p)[inside] <= shift * size[inside] / 2 + 1e-5)
                assert b[0] <= p[0] <= b[2] and b[1] <= p[1] <= b[3]
            ious.append(iou(*boxes))
        mean_iou[shift] = float(np.mean(ious))
    assert mean_iou[0.0] > 0.75 and mean_iou[0.0] > mean_iou[0.5] + 0.1 > mean_iou[1.0] + 0.2


def test_augment_keeps_shape_varies_by_seed_and_is_seeded():
    image = _image(_left_breast(80, 60, cols=40))
    xs = [augment(image, _seed(0, i), **_crop(input_size=[40, 32])).numpy() for i in range(4)]
    assert all(x.shape == (40, 32, 1) and np.isfinite(x).all() for x in xs)
    assert min(np.abs(a - b).mean() for a, b in zip(xs, xs[1:])) > 1e-3
    np.testing.assert_array_equal(xs[0], augment(image, _seed(0, 0), **_crop(input_size=[40, 32])).numpy())


def test_augment_crops_hold_breast_and_keep_the_whole_image_outside_constant():
    stored = _left_breast(200, 150, cols=15)  # the breast is the left 10% of the image
    image = _image(stored)
    fill = float(model_input(image, TARGET_MEAN).numpy()[0, -1, 0])  # the whole image's outside constant
    crop = _crop(crop_scale=[0.02, 0.03], rotation_deg=0.0, jitter=0.0)
    crops = np.stack([augment(image, _seed(1, i), **crop).numpy() for i in range(40)])
    breast = crops > fill + 1e-3
    assert breast.reshape(40, -1).any(axis=1).all()  # every crop is centred on breast (random ones: ~1 in 10)
    assert crops.min() >= min(fill, 0.0) - 1e-4  # no crop-own constant (far below 0 for a mostly-breast crop)


def test_augment_jitter_scales_brightness_and_contrast_within_its_range():
    image = _image(_left_breast(80, 60, cols=60))
    plain = augment(image, _seed(5, 0), **_crop(jitter=0.0)).numpy()
    jittered = augment(image, _seed(5, 0), **_crop(jitter=0.5)).numpy()  # same crop and flip, then x b, then contrast c
    m = plain.mean()
    # jittered = (b plain - b m) c + b m: an affine map of plain with slope b c, fixed point m
    slope = np.polyfit(plain.ravel(), jittered.ravel(), 1)[0]
    np.testing.assert_allclose(jittered, (plain - m) * slope + jittered.mean(), atol=1e-4)
    assert 0.6 ** 2 - 1e-6 <= slope <= 1.4 ** 2 + 1e-6 and abs(slope - 1) > 1e-3


def test_crop_input_rotates_about_the_box_centre():
    rng = np.random.default_rng(0)
    stored = to_stored(rng.uniform(0.1, 0.9, (33, 33)).astype(np.float32), np.ones((33, 33), bool))
    image = _image(stored)
    args = dict(input_size=[33, 33], target_mean=TARGET_MEAN)
    ref = model_input(image, TARGET_MEAN).numpy()[..., 0]
    same, quarter = crop_input(image, [[0.0, 0.0, 1.0, 1.0]] * 2, angles=[0.0, np.pi / 2], **args).numpy()[..., 0]
    np.testing.assert_allclose(same, ref, atol=1e-5)  # the whole image, unrotated: itself
    np.testing.assert_allclose(quarter, np.rot90(ref), atol=1e-4)  # output (i, j) samples input (j, n - 1 - i)
    # a box of the top-left quarter at 2x: every other output pixel is an input pixel
    zoom = crop_input(image, [[0.0, 0.0, 0.5, 0.5]], angles=[0.0], **args).numpy()[0, ::2, ::2, 0]
    np.testing.assert_allclose(zoom, ref[:17, :17], atol=1e-5)


def test_evaluation_tiles_cover_the_breast_at_the_training_scale():
    args = dict(input_size=[32, 24], crop_scale=[0.25, 0.25], target_mean=TARGET_MEAN)  # tile side: half of each side
    stored = _left_breast()  # 64x48, the left half is breast: of the 2x2 grid the two left tiles are kept
    tiles = evaluation_tiles(stored, **args)
    assert tiles.shape == (2, 32, 24, 1)
    v, mask = from_stored(stored)
    ref = np.where(mask, v, float(model_input(tf.constant(stored[..., None]), TARGET_MEAN).numpy()[0, -1, 0]))
    # crop_and_resize samples [y0 (h - 1), y1 (h - 1)]: nearly pixel-aligned here, but its last column
    # (x = 23.5) blends the breast edge with the outside
    for tile, (r, c) in zip(tiles[..., 0], [(0, 0), (32, 0)]):
        np.testing.assert_allclose(tile[:, :-1], ref[r:r + 32, c:c + 23], atol=0.01)
    # resized to the pair records' size first: same grid, half the pixels
    assert evaluation_tiles(stored, pair_size=[32, 24], **args).shape == (2, 32, 24, 1)
    no_breast = np.zeros_like(stored)
    no_breast[:4, -4:] = stored[:4, :4]  # a sliver of breast in the top-right tile only: that tile is kept
    assert np.allclose(evaluation_tiles(no_breast, **args)[0, :2, -2:, 0], from_stored(stored)[0][:2, :2], atol=0.05)


# -------------------------------------------------------------------------------------- patches
@pytest.fixture(scope="module")
def image_records(tiny_records):
    index = load_index(tiny_records)
    return [raw.numpy() for raw in tf.data.TFRecordDataset(sorted(all_shards(index, tiny_records, "train")))]


def _samples(raw):
    """Reference list of a record's patch samples: (lesion index, class), healthy (-1, 0) first when label 0."""
    r = parse(tf.constant(raw), decode_image=False)
    names = [c.decode() for c in r["lesion_class"].numpy()]
    healthy = [(-1, 0)] if int(r["label"]) == 0 else []
    return healthy + [(k, 1 + LESION_CLASSES.index(n)) for k, n in enumerate(names)]


def _outside_value(stored, target_mean=TARGET_MEAN):
    """The model-input value outside the breast, from its definition: the image mean is ``target_mean``."""
    x = model_input(tf.constant(stored), target_mean).numpy()
    return float(x[stored == 0][0])


def test_patch_decoder_centres_lesions_and_healthy_breast(image_records):
    size = 16
    decode = patch_decoder(patch_size=size, target_mean=TARGET_MEAN, seed=0, jitter=0.0)
    seen = set()
    for i, raw in enumerate(image_records[:40]):
        r = parse(tf.constant(raw))
        stored = r["image"].numpy()
        img = model_input(r["image"], TARGET_MEAN).numpy()[..., 0]
        h, w = img.shape
        padded = np.pad(img, size // 2, constant_values=_outside_value(stored))
        boxes = r["boxes"].numpy()
        for k, cls_ref in _samples(raw):
            patch, cls = (t.numpy() for t in decode(tf.constant(i, tf.int64), tf.constant(raw), tf.constant(k)))
            assert cls == cls_ref
            seen.add(int(cls))
            if k >= 0:  # centred on box k (x_min, y_min, x_max, y_max)
                cy = int(np.clip(np.round((boxes[k, 1] + boxes[k, 3]) / 2), 0, h - 1))
                cx = int(np.clip(np.round((boxes[k, 0] + boxes[k, 2]) / 2), 0, w - 1))
                np.testing.assert_allclose(patch[..., 0], padded[cy:cy + size, cx:cx + size], atol=1e-6)
            else:  # centred on a breast pixel outside every box
                windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size))[:h, :w]
                ys, xs = np.nonzero(np.abs(windows - patch[..., 0]).max(axis=(2, 3)) < 1e-6)
                inside = ((boxes[:, 0] <= xs[:, None] + 0.5) & (xs[:, None] + 0.5 < boxes[:, 2])
                          & (boxes[:, 1] <= ys[:, None] + 0.5) & (ys[:, None] + 0.5 < boxes[:, 3])).any(axis=1)
                assert ((stored[ys, xs, 0] > 0) & ~inside).any()
    assert 0 in seen and len(seen) >= 3


def test_patch_decoder_is_seeded_by_index_and_the_same_in_map(image_records):
    decode = patch_decoder(patch_size=16, target_mean=TARGET_MEAN, seed=3, augment=AUG)
    raws = tf.constant(image_records[:12])
    ks = tf.constant([_samples(r)[-1][0] for r in image_records[:12]])
    eager = _assert_same_in_map(lambda i: decode(i, raws[i], ks[i]), n=12, atol=1e-5)
    parallel = tf.data.Dataset.zip(tf.data.Dataset.range(12), tf.data.Dataset.from_tensor_slices(raws),
                                   tf.data.Dataset.from_tensor_slices(ks))
    for e, m in zip(eager, parallel.map(decode, num_parallel_calls=4, deterministic=True)):  # as the stage runs it
        np.testing.assert_array_equal(m[0].numpy(), e[0].numpy())
        assert int(m[1]) == int(e[1])
    again = decode(tf.constant(0, tf.int64), raws[0], ks[0])[0].numpy()
    np.testing.assert_array_equal(again, eager[0][0].numpy())
    others = [decode(tf.constant(i, tf.int64), raws[0], ks[0])[0].numpy() for i in range(1, 6)]
    assert any(not np.array_equal(o, again) for o in others)  # another index, another draw


AUG = {"flip_h": 0.5, "flip_v": 0.5, "rotation": 20.0, "zoom": (0.9, 1.1), "shear": 10.0}


def test_augmented_window_is_the_plain_window_at_identity_and_keeps_the_lesion(image_records):
    """Zero ranges: the warped region is exactly the plain patch (the region and patch centres agree). Any
    ranges: the patch is the region warped centre to centre, so a lesion centred in the region stays at the
    patch centre, inside its moved box."""
    from mammodg.augment.patches import _window, augmented_window, region_size

    raw = next(r for r in image_records if len(_samples(r)) > 1 and _samples(r)[-1][0] >= 0)
    r = parse(tf.constant(raw))
    img, fill = model_input(r["image"], TARGET_MEAN), _outside_value(r["image"].numpy())
    b = r["boxes"][0]
    centre = tf.stack([(b[1] + b[3]) / 2, (b[0] + b[2]) / 2])
    identity = {"flip_h": 0.0, "flip_v": 0.0, "rotation": 0.0, "zoom": (1.0, 1.0), "shear": 0.0}
    assert region_size(16, identity) == 2 * 12 + 2 and region_size(16, AUG) > 16 * 2 ** 0.5
    plain = _window(img, fill, centre, 16)[0].numpy()
    warped, boxes = augmented_window(img, fill, centre, b, tf.constant([1, 2], tf.int64), patch_size=16, ranges=identity)
    np.testing.assert_allclose(warped.numpy(), plain, atol=1e-5)
    differ = 0
    for i in range(20):
        warped, boxes = augmented_window(img, fill, centre, b, tf.constant([5, i], tf.int64), patch_size=16, ranges=AUG)
        x0, y0, x1, y1 = boxes.numpy()[0]  # kept, and still around the patch centre (8, 8) up to the rounding
        assert x0 <= 8.5 + 0.71 and x1 >= 7.5 - 0.71 and y0 <= 8.5 + 0.71 and y1 >= 7.5 - 0.71
        differ += not np.allclose(warped.numpy(), plain)
    assert differ >= 18


@pytest.fixture(scope="module")
def unboxed_records(tiny_records, tmp_path_factory):
    """tiny_records with the boxes removed from the first 5 label-1 records of each training shard that has
    one: label-1 images without boxes (returns the folder and the number of such records)."""
    import shutil

    out = tmp_path_factory.mktemp("unboxed") / "d"
    shutil.copytree(tiny_records, out)
    stripped = 0
    for path in sorted(all_shards(load_index(out), out, "train")):
        raws = [raw.numpy() for raw in tf.data.TFRecordDataset(path)]
        done = 0
        with tf.io.TFRecordWriter(path) as w:
            for raw in raws:
                ex = tf.train.Example.FromString(raw)
                f = ex.features.feature
                if f["label"].int64_list.value[0] == 1 and done < 5:
                    for key in [k for k in f if k.startswith("boxes/")]:
                        del f[key]
                    done += 1
                w.write(ex.SerializeToString())
        stripped += done
    return out, stripped


def _reference_census(data_dir, split):
    counts, unboxed, samples = np.zeros(5, int), 0, []
    for path in sorted(all_shards(load_index(data_dir), data_dir, split)):
        for raw in tf.data.TFRecordDataset(path):
            r = parse(raw, decode_image=False)
            s = _samples(raw.numpy())
            unboxed += int(r["label"]) == 1 and len(s) == 0
            samples += [(r["image_id"].numpy(), k, c, int(r["label"])) for k, c in s]
            for _, c in s:
                counts[c] += 1
    return counts, unboxed, samples


def _sample_key(i, raw, k):
    """A decode that skips the image: (image id, lesion index, class from the record, label)."""
    from mammodg.augment.patches import lesion_classes

    r = parse(raw, decode_image=False)
    cls = tf.cond(k >= 0, lambda: lesion_classes(r["lesion_class"])[tf.maximum(k, 0)], lambda: tf.constant(0, tf.int32))
    return r["image_id"], k, cls, tf.cast(r["label"], tf.int32)


def test_census_and_fixed_set_count_samples_and_skip_unboxed_malignant(unboxed_records):
    from mammodg.sampling.indexed import patch_census, patch_split

    data, stripped = unboxed_records
    counts, unboxed, samples = _reference_census(data, "train")
    assert unboxed >= stripped > 0
    census = patch_census(data, "train")
    assert list(census["counts"].values()) == counts.tolist() and census["unboxed_malignant"] == unboxed
    fixed = [(a.numpy(), int(k), int(c), int(y)) for a, k, c, y in patch_split(data, _sample_key, split="train")]
    assert fixed == samples  # every sample once, in shard and box order; the unboxed label-1 records give none
    assert all(y == 0 for _, k, _, y in fixed if k < 0)  # healthy only from label-0 images


@pytest.mark.parametrize("batch", [8, 10])
def test_patch_batches_balance_the_five_classes(unboxed_records, batch):
    """Each class is 1/5 of the samples (here exactly, as the classes are taken in turn: well within the
    binomial tolerance of i.i.d. draws); every batch holds each class floor or ceil
    of batch / 5 times; healthy samples come only from label-0 images and lesion samples carry their box's
    class; label-1 images without boxes never appear."""
    from mammodg.sampling.indexed import patch_batches

    data, _ = unboxed_records
    _, _, samples = _reference_census(data, "train")
    valid = {(a, k): c for a, k, c, _ in samples}
    ds, census = patch_batches(data, _sample_key, split="train", seed=1, batch_size=batch, shuffle_budget=64)
    n_batches, totals, seen = 120, np.zeros(5, int), set()
    for ids, ks, cls, labels in ds.take(n_batches):
        per = np.bincount(cls.numpy(), minlength=5)
        assert per.min() >= batch // 5 and per.max() <= -(-batch // 5)
        totals += per
        for a, k, c, y in zip(ids.numpy(), ks.numpy(), cls.numpy(), labels.numpy()):
            assert valid[(a, int(k))] == c and (k >= 0 or y == 0)
            seen.add((a, int(k)))
    n = n_batches * batch
    assert np.all(np.abs(totals - n / 5) <= 3 * np.sqrt(n * 0.2 * 0.8))
    assert len(seen) > 0.5 * min(n, len(valid))  # draws spread over the samples, not a few repeated


def test_patch_batches_refuse_no_samples_and_balance_over_present_classes(unboxed_records):
    from mammodg.records.reader import DatasetError
    from mammodg.sampling.indexed import patch_batches, patch_census

    data, _ = unboxed_records
    census = patch_census(data, "train")
    census["files"][3] = []  # as if benign_calc had no sample: balanced over the other 4
    ds, _ = patch_batches(data, _sample_key, split="train", seed=0, batch_size=8, census=census)
    cls = np.concatenate([b[2].numpy() for b in ds.take(10)])
    assert set(np.unique(cls)) == {0, 1, 2, 4} and np.bincount(cls, minlength=5)[[0, 1, 2, 4]].tolist() == [20] * 4
    census["files"] = [[] for _ in census["files"]]
    with pytest.raises(DatasetError, match="no patch sample"):
        patch_batches(data, _sample_key, split="train", seed=0, batch_size=8, census=census)


def _batches(ds, n):
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in ds.take(n)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True))


def test_patch_validation_is_fixed_and_augmentation_touches_training_only(unboxed_records, capsys):
    from mammodg.config import TrainConfig
    from mammodg.stages.patch import patch_batches, validation_patches

    tiny_records, _ = unboxed_records
    _, unboxed, _ = _reference_census(tiny_records, "train")
    on = TrainConfig(stage="patch", data_dir=str(tiny_records), batch_size=8, seed=2)
    on.patch.patch_size = 16
    off = TrainConfig(stage="patch", data_dir=str(tiny_records), batch_size=8, seed=2)
    off.patch.patch_size, off.patch.augment.enabled = 16, False
    first = _batches(validation_patches(on), 1000)
    assert sum(len(b[1]) for b in first) == len(_reference_census(tiny_records, "val")[2])
    assert _same(first, _batches(validation_patches(on), 1000))  # two validations: identical inputs
    assert _same(first, _batches(validation_patches(off), 1000))  # augmentation never reaches validation
    train_on, train_off = _batches(patch_batches(on), 3), _batches(patch_batches(off), 3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(train_on, train_off))  # same samples and classes
    assert all(not np.allclose(a[0], b[0]) for a, b in zip(train_on, train_off))  # augmented patches
    assert f"{unboxed} label-1 image(s) without boxes give no patch" in capsys.readouterr().out  # the run log counts them


def test_classifier_augmentation_touches_training_only(tiny_records):
    from mammodg.config import TrainConfig
    from mammodg.records.schema import model_input
    from mammodg.stages.classifier import classifier_batches

    on = TrainConfig(stage="classifier", data_dir=str(tiny_records), batch_size=4, seed=2, strategy="balanced_labels")
    off = TrainConfig(stage="classifier", data_dir=str(tiny_records), batch_size=4, seed=2, strategy="balanced_labels")
    off.classifier.augment.enabled = False
    a, b = _batches(classifier_batches(on), 3), _batches(classifier_batches(off), 3)
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(a, b)) and not any(np.allclose(x[0], y[0]) for x, y in zip(a, b))
    # off: exactly the whole-image model input of the records drawn
    ref = [model_input(parse(raw)["image"], TARGET_MEAN).numpy() for raw in image_records_of(tiny_records)]
    assert all(any(np.array_equal(x, r) for r in ref) for x in b[0][0])


def image_records_of(data_dir):
    return list(tf.data.TFRecordDataset(sorted(all_shards(load_index(data_dir), data_dir, "train"))))


def test_image_decoder_identity_warp_and_lesion_kept(image_records):
    """Zero ranges: the whole-image model input itself; a zoom that pushes a lesion box out of the image:
    the image is kept unwarped (the lesion stays visible); otherwise warped, same shape."""
    from mammodg.augment.patches import image_decoder

    identity = {"flip_h": 0.0, "flip_v": 0.0, "rotation": 0.0, "zoom": (1.0, 1.0), "shear": 0.0}
    raw = next(r for r in image_records if _samples(r) and _samples(r)[-1][0] >= 0)
    ref = model_input(parse(tf.constant(raw))["image"], TARGET_MEAN).numpy()
    i = tf.constant(0, tf.int64)
    x, y = image_decoder(target_mean=TARGET_MEAN, seed=0, augment=identity)(i, tf.constant(raw))
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-5)
    assert int(y) == int(parse(tf.constant(raw))["label"])
    huge = dict(identity, zoom=(8.0, 8.0))  # x8 about the centre: the boxes of the 64x48 image leave it
    x, _ = image_decoder(target_mean=TARGET_MEAN, seed=0, augment=huge)(i, tf.constant(raw))
    np.testing.assert_array_equal(x.numpy(), ref)
    x, _ = image_decoder(target_mean=TARGET_MEAN, seed=0, augment=AUG)(i, tf.constant(raw))
    assert x.shape == ref.shape
