"""Geometric augmentation with boxes (mammodg.augment.geometry): exact flips, identity, boxes that follow
the pixels, dropped boxes, the matrix against a step-by-step numpy reference, eager == Dataset.map."""
import cmath
import math

import numpy as np
import pytest
import tensorflow as tf

from mammodg.augment import geometry as g

H, W = 40, 56
RANGES = dict(flip_h=0.5, flip_v=0.5, rotation=25.0, zoom=(0.7, 1.3), shear=12.0)


def _square_image(dtype=np.uint16, box=(14, 10, 24, 18), value=1000):
    x0, y0, x1, y1 = box
    img = np.zeros((H, W, 1), dtype)
    img[y0:y1, x0:x1] = value
    return img, np.array([box], np.float32)


def test_identity_parameters_return_input_bit_identically():
    rng = np.random.default_rng(0)
    boxes = np.array([[3.5, 4.25, 20.0, 30.0], [0.0, 0.0, 56.0, 40.0]], np.float32)
    for img in (rng.integers(0, 65536, (H, W, 1)).astype(np.uint16), rng.random((H, W, 3)).astype(np.float32)):
        for interp in ("bilinear", "nearest"):
            out, b, c = g.random_affine(img, boxes, tf.constant([1, 2]), [7, 8], interpolation=interp)
            assert out.dtype == img.dtype and np.array_equal(out.numpy(), img)
            assert np.array_equal(b.numpy(), boxes) and c.numpy().tolist() == [1, 2]


@pytest.mark.parametrize("flip_h,flip_v", [(True, False), (False, True), (True, True)])
def test_flips_move_pixels_and_boxes_by_the_exact_formula(flip_h, flip_v):
    rng = np.random.default_rng(1)
    img = rng.integers(1, 65536, (H, W, 1)).astype(np.uint16)
    boxes = np.array([[3.0, 5.5, 11.0, 20.0], [40.25, 0.0, 56.0, 7.0]], np.float32)
    m = g.affine_matrix(height=H, width=W, flip_h=flip_h, flip_v=flip_v)
    out, b, cls = g.apply_affine(img, boxes, tf.constant([b"mass", b"calc"]), m)
    want_img = img[:, ::-1] if flip_h else img
    want_img = want_img[::-1] if flip_v else want_img
    assert np.array_equal(out.numpy(), want_img)
    x0, y0, x1, y1 = boxes.T
    if flip_h:
        x0, x1 = W - x1, W - x0
    if flip_v:
        y0, y1 = H - y1, H - y0
    np.testing.assert_allclose(b.numpy(), np.stack([x0, y0, x1, y1], -1), atol=1e-5)
    assert cls.numpy().tolist() == [b"mass", b"calc"]


def _numpy_forward(p, *, flip_h, flip_v, rotation, zoom, shear, c_in, c_out):
    """Step by step, independent of matrices: centre, zoom, shear, rotate (complex product), flip, recentre."""
    x, y = p[0] - c_in[0], p[1] - c_in[1]
    x, y = zoom * x, zoom * y
    x = x + math.tan(shear) * y
    z = complex(x, y) * cmath.exp(1j * rotation)
    x, y = z.real, z.imag
    x, y = (-x if flip_h else x), (-y if flip_v else y)
    return x + c_out[0], y + c_out[1]


def test_affine_matrix_matches_a_numpy_step_by_step_reference():
    rng = np.random.default_rng(2)
    for trial in range(6):
        params = dict(flip_h=bool(trial % 2), flip_v=bool(trial // 2 % 2), rotation=float(rng.uniform(-1, 1)),
                      zoom=float(rng.uniform(0.5, 2)), shear=float(rng.uniform(-0.4, 0.4)))
        h, w, oh, ow = 30, 50, 20, 24
        m = g.affine_matrix(height=h, width=w, out_height=oh, out_width=ow, **params).numpy()
        assert np.allclose(m[2], [0, 0, 1])
        for p in rng.uniform(-10, 60, (5, 2)):
            want = _numpy_forward(p, c_in=(w / 2, h / 2), c_out=(ow / 2, oh / 2), **params)
            np.testing.assert_allclose(m[:2] @ [p[0], p[1], 1.0], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", [(0, 1), (3, 4), (5, 9), (11, 2)])
def test_a_bright_square_stays_inside_its_transformed_box(seed):
    img, boxes = _square_image()
    # nearest: an output pixel is bright iff its centre's preimage is in the square -> exactly inside the box
    out, b, _ = g.random_affine(img, boxes, tf.constant([0]), seed, interpolation="nearest", **RANGES)
    assert b.shape == (1, 4), "the lesion box must survive a moderate transform"
    x0, y0, x1, y1 = b.numpy()[0]
    ys, xs = np.nonzero(out.numpy()[..., 0])
    assert len(xs) > 0.5 * 80 * 0.7 ** 2  # the lesion (80 px) is still there, area scaled by at least zoom^2
    assert (xs + 0.5 >= x0).all() and (xs + 0.5 <= x1).all() and (ys + 0.5 >= y0).all() and (ys + 0.5 <= y1).all()
    # bilinear can bleed by less than one pixel
    out, b2, _ = g.random_affine(img, boxes, tf.constant([0]), seed, interpolation="bilinear", **RANGES)
    np.testing.assert_array_equal(b2.numpy(), b.numpy())
    ys, xs = np.nonzero(out.numpy()[..., 0])
    assert (xs >= x0 - 1).all() and (xs + 1 <= x1 + 1).all() and (ys >= y0 - 1).all() and (ys + 1 <= y1 + 1).all()


def test_flip_scale_box_is_tight_around_the_pixels():
    img, boxes = _square_image()
    for seed in range(5):
        out, b, _ = g.random_flip_scale(img, boxes, tf.constant([0]), [seed, 0], flip_h=0.5, flip_v=0.5,
                                        scale=(0.6, 1.6), interpolation="nearest")
        x0, y0, x1, y1 = b.numpy()[0]
        ys, xs = np.nonzero(out.numpy()[..., 0])
        # no rotation/shear: the box is the square's image, so the pixel extent fills it to within a pixel
        assert abs(xs.min() - x0) <= 1 and abs(xs.max() + 1 - x1) <= 1
        assert abs(ys.min() - y0) <= 1 and abs(ys.max() + 1 - y1) <= 1
        np.testing.assert_allclose((x1 - x0) / (y1 - y0), 10 / 8, rtol=1e-5)  # aspect kept


def test_boxes_that_leave_the_image_or_become_degenerate_are_dropped_with_their_classes():
    # zoom 2 about the centre (28, 20): x -> 2x - 28, y -> 2y - 20
    boxes = np.array([
        [0.0, 0.0, 6.0, 6.0],      # -> [-28,-20,-16,-8]: entirely outside
        [20.0, 15.0, 30.0, 25.0],  # -> [12,10,32,30]: inside
        [50.0, 10.0, 60.0, 20.0],  # -> [72..]: outside
        [1.0, 12.0, 17.0, 20.0],   # -> [-26,4,6,20]: 6/32 of its width left = 19% < 25%: dropped
        [5.0, 12.0, 21.0, 20.0],   # -> [-18,4,14,20]: 14/32 = 44% left: kept, clipped to [0,4,14,20]
        [27.9, 12.0, 28.4, 20.0],  # -> 1 px wide: degenerate
    ], np.float32)
    classes = {"cls": tf.constant([b"a", b"b", b"c", b"d", b"e", b"f"]), "birads": tf.constant([1, 2, 3, 4, 5, 6])}
    m = g.affine_matrix(height=H, width=W, zoom=2.0)
    _, b, kept = g.apply_affine(np.zeros((H, W, 1), np.float32), boxes, classes, m)
    np.testing.assert_allclose(b.numpy(), [[12, 10, 32, 30], [0, 4, 14, 20]], atol=1e-4)
    assert kept["cls"].numpy().tolist() == [b"b", b"e"] and kept["birads"].numpy().tolist() == [2, 5]


def test_fill_value_is_used_outside_the_input():
    img = np.full((H, W, 1), 7.0, np.float32)
    m = g.affine_matrix(height=H, width=W, zoom=0.5)
    out, _, _ = g.apply_affine(img, np.zeros((0, 4), np.float32), tf.zeros([0]), m, fill_value=-3.0)
    out = out.numpy()[..., 0]
    assert out[0, 0] == -3.0 and out[H // 2, W // 2] == 7.0
    with pytest.raises(ValueError, match="interpolation"):
        g.apply_affine(img, np.zeros((0, 4)), tf.zeros([0]), m, interpolation="cubic")
    with pytest.raises(ValueError, match=r"image must be \(height, width, channels\)"):
        g.apply_affine(img[..., 0], np.zeros((0, 4)), tf.zeros([0]), m)


def test_output_size_warps_a_larger_crop_onto_a_smaller_canvas():
    img, boxes = _square_image(np.float32, box=(23, 15, 33, 25), value=1.0)  # centred on (28, 20)
    out, b, _ = g.random_affine(img, boxes, tf.constant([0]), [1, 1], output_size=(20, 24), **RANGES)
    assert out.shape == (20, 24, 1)
    spec = tf.data.Dataset.from_tensors(img).map(
        lambda im: g.random_affine(im, boxes, tf.constant([0]), [1, 1], output_size=(20, 24))[0]).element_spec
    assert spec.shape == (20, 24, 1)
    cx, cy = (b.numpy()[0, 0] + b.numpy()[0, 2]) / 2, (b.numpy()[0, 1] + b.numpy()[0, 3]) / 2
    np.testing.assert_allclose([cx, cy], [12, 10], atol=1e-4)  # centre to centre


def test_eager_and_dataset_map_give_identical_outputs():
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 65536, (3, H, W, 1)).astype(np.uint16)
    boxes = np.array([[10, 8, 30, 22], [2, 2, 12, 9]], np.float32)
    classes = tf.constant([b"mass", b"calc"])
    seeds = np.array([[1, 2], [3, 4], [5, 6]], np.int64)
    kwargs = dict(fill_value=0.0, **RANGES)
    eager = [g.random_affine(imgs[i], boxes, classes, seeds[i], **kwargs) for i in range(3)]

    ds = tf.data.Dataset.from_tensor_slices((imgs, seeds.astype(np.int32))).map(
        lambda im, s: g.random_affine(im, boxes, classes, s, **kwargs))
    assert ds.element_spec[0].shape == (H, W, 1)  # static shape kept, so the stream can be batched
    mapped = list(ds)
    assert len(mapped) == 3
    for (ei, eb, ec), (mi, mb, mc) in zip(eager, mapped):
        assert np.array_equal(ei.numpy(), mi.numpy())
        assert np.array_equal(eb.numpy(), mb.numpy()) and ec.numpy().tolist() == mc.numpy().tolist()
    assert not np.array_equal(eager[0][0].numpy(), eager[1][0].numpy())  # seeds matter
    again = g.random_affine(imgs[0], boxes, classes, seeds[0], **kwargs)
    assert np.array_equal(again[0].numpy(), eager[0][0].numpy())


def test_random_parameters_stay_in_their_ranges():
    flips = []
    for s in range(40):
        p = {k: v.numpy() for k, v in g.random_affine_params([s, 1], **RANGES).items()}
        assert abs(p["rotation"]) <= math.radians(25) and abs(p["shear"]) <= math.radians(12)
        assert 0.7 <= p["zoom"] <= 1.3
        flips.append((bool(p["flip_h"]), bool(p["flip_v"])))
    assert len(set(flips)) == 4  # both flips happen, independently
