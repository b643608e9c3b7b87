"""Mass-matching building blocks (mammodg.augment.matching) on hand-made detections, worked out by hand."""
import numpy as np
import pytest

from mammodg.augment import matching as M

GT = [[0, 0, 10, 10], [20, 20, 30, 30]]


def test_box_iou_by_hand():
    assert M.box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3]])[0, 0] == pytest.approx(1 / 7)
    assert M.box_iou([[0, 0, 10, 10]], [[1, 0, 11, 10]])[0, 0] == pytest.approx(90 / 110)
    assert M.box_iou([[0, 0, 1, 1]], [[5, 5, 6, 6]])[0, 0] == 0.0
    assert M.box_iou(np.zeros((0, 4)), GT).shape == (0, 2)


def test_mark_detections_by_hand():
    dets = [[0, 0, 10, 10],  # IoU 1 with gt 0: TP
            [1, 0, 11, 10],  # IoU 0.82 with gt 0, already taken by a higher score: FP (duplicate)
            [20, 20, 30, 35],  # IoU 100/150 with gt 1: TP (taken first: higher score)
            [20, 20, 30, 40],  # IoU exactly 0.5 with gt 1, already taken: FP
            [50, 50, 60, 60]]  # overlaps nothing: FP
    scores = [0.9, 0.8, 0.95, 0.7, 0.99]
    assert M.mark_detections(dets, scores, GT).tolist() == [0, -1, 1, -1, -1]
    # without the better detection, IoU = 0.5 exactly is a TP (>= threshold) ...
    assert M.mark_detections([dets[3]], [0.7], GT).tolist() == [1]
    # ... and not at a stricter threshold
    assert M.mark_detections([dets[3]], [0.7], GT, iou_threshold=0.6).tolist() == [-1]
    # the higher score wins the ground truth even with the lower IoU (0.71 vs 1.0)
    assert M.mark_detections([[0, 0, 10, 10], [0, 0, 10, 14]], [0.5, 0.6], GT).tolist() == [-1, 0]
    assert M.mark_detections(dets, scores, np.zeros((0, 4))).tolist() == [-1] * 5
    assert M.mark_detections(np.zeros((0, 4)), [], GT).tolist() == []
    with pytest.raises(ValueError, match="scores"):
        M.mark_detections(dets, scores[:2], GT)


def test_matching_pairs_by_hand():
    cc_gt_of = [0, -1, 1]  # det 0 on lesion 0, det 1 FP, det 2 on lesion 1
    mlo_gt_of = [1, 0]  # det 0 on the MLO's gt 1, det 1 on its gt 0
    ids = M.lesion_ids_by_order(2, 2)
    ci, mj, y = M.matching_pairs(cc_gt_of, mlo_gt_of, *ids)
    got = sorted(zip(ci.tolist(), mj.tolist(), y.tolist()))
    assert got == [(0, 0, 0),  # lesion 0 vs lesion 1: different lesions
                   (0, 1, 1),  # lesion 0 in both views
                   (1, 0, 0), (1, 1, 0),  # any pair with the FP
                   (2, 0, 1),  # lesion 1 in both views
                   (2, 1, 0)]
    ci, mj, y = M.matching_pairs(cc_gt_of, mlo_gt_of, *ids, tp_mismatch_negative=False)
    assert sorted(zip(ci.tolist(), mj.tolist(), y.tolist())) == [(0, 1, 1), (1, 0, 0), (1, 1, 0), (2, 0, 1)]


def test_unknown_identity_gives_no_positive():
    cc_ids, mlo_ids = M.lesion_ids_by_order(2, 1)  # one view lists a lesion the other does not
    assert set(cc_ids.tolist()).isdisjoint(mlo_ids.tolist())
    ci, mj, y = M.matching_pairs([0, 1], [0], cc_ids, mlo_ids)
    assert y.tolist() == [0, 0] and ci.tolist() == [0, 1] and mj.tolist() == [0, 0]
    ci, mj, y = M.matching_pairs([], [0, -1], [], [0])  # no CC detections: no pairs
    assert len(ci) == len(mj) == len(y) == 0


def test_crop_window_by_hand():
    # long side 20 (x), enlarged by 20% to a 24 x 24 square around the centre (20, 22.5)
    np.testing.assert_allclose(M.crop_windows([[10, 20, 30, 25]]).numpy(), [[8, 10.5, 32, 34.5]])


def _marked(h=64, w=48):
    img = np.zeros((h, w, 1), np.float32)
    img[27, 18] = 1.0  # the marked pixel (row 27, column 18)
    img[40:42, 30:32] = 1.0  # a 2 x 2 block
    return img


def test_marked_pixel_lands_where_expected():
    img = _marked()
    # centre (20, 30), long side 25/3 -> a 10 x 10 window from (15, 25): one input pixel per output pixel
    box = [20 - 25 / 6, 30 - 2, 20 + 25 / 6, 30 + 2]
    out = M.roi_crops(img, [box], size=10).numpy()[0, ..., 0]
    assert out.shape == (10, 10)
    expected = np.zeros((10, 10), np.float32)
    expected[27 - 25, 18 - 15] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # a 20 x 20 window from (x 26, y 36) resized to 10: output (k, l) averages input rows 36+2k..+1,
    # columns 26+2l..+1; the block at rows 40-41, columns 30-31 is output (2, 2), exactly 1
    box2 = [36 - 25 / 3, 46 - 1, 36 + 25 / 3, 46 + 1]
    out2 = M.roi_crops(img, [box2], size=10).numpy()[0, ..., 0]
    expected2 = np.zeros((10, 10), np.float32)
    expected2[2, 2] = 1.0
    np.testing.assert_allclose(out2, expected2, atol=1e-6)


def test_outside_the_image_is_zero():
    img = np.ones((32, 32, 1), np.float32)
    out = M.roi_crops(img, [[-10, -10, 10, 10]], size=8, enlarge=0.0).numpy()[0, ..., 0]
    assert np.all(out[:4, :4] == 0) and np.all(out[4:, 4:] == 1)


def test_eager_equals_dataset_map():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    imgs = rng.random((3, 40, 32, 1)).astype(np.float32)
    boxes = np.array([[[3, 4, 15, 12], [10, 10, 30, 38]]] * 3, np.float32) + rng.uniform(-2, 2, (3, 2, 4)).astype(np.float32)
    eager = np.stack([M.roi_crops(i, b, size=16).numpy() for i, b in zip(imgs, boxes)])
    ds = tf.data.Dataset.from_tensor_slices((imgs, boxes)).map(lambda i, b: M.roi_crops(i, b, size=16))
    mapped = np.stack([x.numpy() for x in ds])
    assert mapped.shape == (3, 2, 16, 16, 1)
    np.testing.assert_array_equal(mapped, eager)


def test_geometric_features_by_hand():
    box = [[20, 40, 30, 60]]  # centre (25, 50), 10 x 20
    cc = M.geometric_features(box, nipple=(80, 50), chest_wall=((0, 0), (0, 100)), image_height=100)
    np.testing.assert_allclose(cc, [[0.55, 0.25, np.sqrt(200) / 100]], rtol=1e-6)
    mlo = M.geometric_features(box, nipple=(80, 50), chest_wall=((40, 0), (0, 40)), image_height=100)
    # |x + y - 40| / sqrt(2) = 35 / sqrt(2)
    np.testing.assert_allclose(mlo[0, 1], 35 / np.sqrt(2) / 100, rtol=1e-6)
    assert mlo.dtype == np.float32 and M.geometric_features(np.zeros((0, 4)), (0, 0), ((0, 0), (0, 1)), 10).shape == (0, 3)


def test_phantom_boxes_keep_lesion_order_across_views():
    """The identity assumption on phantom truth: a phantom lesion keeps its depth behind the nipple in
    both views, so the k-th CC box and the k-th MLO box of a breast lie at the same horizontal distance
    from the nipple (the other order does not fit)."""
    from itertools import permutations

    from mammodg import phantom as ph

    st = ph.default_styles(1)[0]
    eff = st.pixel_spacing_mm / 0.25
    checked = 0
    for i in range(16):
        for br in ph.sample_patient(np.random.default_rng([0, i]), i):
            if len(br.lesions) < 2:
                continue
            depth = {}
            for view in ("CC", "MLO"):
                _, boxes = ph.render(br, view, st, scale=0.25)
                nx = ph.landmarks(br, view, st, scale=0.25)["nipple"][0]
                depth[view] = np.array([abs(nx - (b["box"][0] + b["box"][2]) / 2) * eff for b in boxes])
            assert len(depth["CC"]) == len(depth["MLO"])
            cc_ids, mlo_ids = M.lesion_ids_by_order(len(depth["CC"]), len(depth["MLO"]))
            assert np.all(np.abs(depth["CC"][cc_ids] - depth["MLO"][mlo_ids]) < 2.0)
            cost = {p: np.abs(depth["CC"] - depth["MLO"][list(p)]).sum() for p in permutations(range(len(mlo_ids)))}
            assert min(cost, key=cost.get) == tuple(mlo_ids)
            checked += 1
    assert checked >= 2
