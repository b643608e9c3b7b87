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


def test_patch_decoder_centres_lesions_and_healthy_breast(image_records):
    size = 16
    decode = patch_decoder(patch_size=size, target_mean=TARGET_MEAN, seed=0, jitter=0.0)
    lesions = healthy = 0
    for i, raw in enumerate(image_records[:40]):
        r = parse(tf.constant(raw))
        patch, cls = (t.numpy() for t in decode(tf.constant(i, tf.int64), tf.constant(raw)))
        img = model_input(r["image"], TARGET_MEAN).numpy()[..., 0]
        h, w = img.shape
        padded = np.pad(img, size // 2, constant_values=img[0, w - 1])
        boxes, names = r["boxes"].numpy(), [c.decode() for c in r["lesion_class"].numpy()]
        if len(boxes):  # centred on one of the boxes (x_min, y_min, x_max, y_max); class 1 + its index in LESION_CLASSES
            cy = np.clip(np.round((boxes[:, 1] + boxes[:, 3]) / 2), 0, h - 1).astype(int)
            cx = np.clip(np.round((boxes[:, 0] + boxes[:, 2]) / 2), 0, w - 1).astype(int)
            match = [k for k in range(len(boxes))
                     if np.allclose(patch[..., 0], padded[cy[k]:cy[k] + size, cx[k]:cx[k] + size], atol=1e-6)]
            assert match and cls in {1 + LESION_CLASSES.index(names[k]) for k in match}
            lesions += 1
        else:  # a breast pixel in the patch centre
            assert cls == 0 and patch[size // 2, size // 2, 0] != img[0, w - 1] and np.isfinite(patch).all()
            healthy += 1
    assert lesions >= 3 and healthy >= 3


def test_patch_decoder_is_seeded_by_index_and_the_same_in_map(image_records):
    decode = patch_decoder(patch_size=16, target_mean=TARGET_MEAN, seed=3)
    raws = tf.constant(image_records[:12])
    eager = _assert_same_in_map(lambda i: decode(i, raws[i]), n=12)
    parallel = tf.data.Dataset.zip(tf.data.Dataset.range(12), tf.data.Dataset.from_tensor_slices(raws))
    for e, m in zip(eager, parallel.map(decode, num_parallel_calls=4, deterministic=True)):  # as the stage runs it
        np.testing.assert_array_equal(m[0].numpy(), e[0].numpy())
        assert int(m[1]) == int(e[1])
    again = decode(tf.constant(0, tf.int64), raws[0])[0].numpy()
    np.testing.assert_array_equal(again, eager[0][0].numpy())
    others = [decode(tf.constant(i, tf.int64), raws[0])[0].numpy() for i in range(1, 6)]
    assert any(not np.array_equal(o, again) for o in others)  # another index, another draw
