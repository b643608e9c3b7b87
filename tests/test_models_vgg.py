"""VGG-like 2-level model (paper appendix A.2): shapes, serialisation, backbone transfer, training, registry."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from mammodg import models
from mammodg.models.vgg import (
    VGGBackbone,
    VGGImageHead,
    malignancy_probability,
    min_input_size,
    patch_classifier,
    vgg_classifier,
)
from mammodg.models.vgg_weights import load_backbone_weights

W = 1 / 16  # tiny widths: filters (2, 4, 8, 16, 16, 32), head (64, 32, 5)


def _x(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _np(t):
    return keras.ops.convert_to_numpy(t)


def _perturb_bn(model, seed=0):
    """Non-trivial BatchNorm statistics so that copies that miss them would show."""
    rng = np.random.default_rng(seed)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) ** 2 for w in model.get_weights()])


@pytest.fixture(scope="module")
def small_classifier():
    keras.utils.set_random_seed(0)
    model = vgg_classifier(input_shape=(288, 208, 1), width=W)
    _perturb_bn(model)
    return model


def test_patch_shapes():
    keras.utils.set_random_seed(0)
    model = patch_classifier(width=W)
    backbone = model.get_layer("backbone")
    x = _x((2, 224, 224, 1))
    assert tuple(backbone(x).shape) == (2, 1, 1, 5)
    assert tuple(model(x).shape) == (2, 5)
    probs = patch_classifier(backbone=backbone, softmax=True)(x)
    np.testing.assert_allclose(_np(probs).sum(-1), 1.0, rtol=1e-5)
    # minimum input size is 192 for 6 blocks; larger patches are max-pooled over positions
    assert min_input_size() == 192 == backbone.min_input_size
    assert backbone.compute_output_shape((None, 192, 192, 1)) == (None, 1, 1, 5)
    assert backbone.compute_output_shape((None, 256, 320, 1)) == (None, 2, 3, 5)
    assert tuple(model.compute_output_shape((3, 224, 224, 1))) == (3, 5)
    with pytest.raises(ValueError, match="below the minimum 192"):
        backbone.compute_output_shape((1, 191, 224, 1))


def test_paper_image_shapes():
    keras.utils.set_random_seed(0)
    model = vgg_classifier(input_shape=(1152, 832, 1), width=1 / 32)
    backbone, head = model.get_layer("backbone"), model.get_layer("image_head")
    assert backbone.filters == (32, 64, 128, 256, 256, 512)
    assert backbone.compute_output_shape((1, 1152, 832, 1)) == (1, 16, 11, 5)
    layout = head.layout((1, 16, 11, 5))
    assert layout == {"pool": (5, 5), "pooled": (3, 2), "kernel": (3, 2), "out": (1, 1)}
    assert tuple(head.a_conv1.kernel.shape) == (3, 2, 5, 16)
    assert tuple(head.b_conv.kernel.shape) == (3, 2, 5, 2)
    assert tuple(model(_x((1, 1152, 832, 1))).shape) == (1, 2)


def test_small_image_classifier(small_classifier):
    head = small_classifier.get_layer("image_head")
    # 288x208 -> backbone map (2, 1): pool the whole map, (3, 2) kernels clipped to (1, 1)
    assert head.layout((None, 2, 1, 5)) == {"pool": (2, 1), "pooled": (1, 1), "kernel": (1, 1), "out": (1, 1)}
    logits = small_classifier(_x((3, 288, 208, 1)))
    assert tuple(logits.shape) == (3, 2)
    p = _np(malignancy_probability(logits))
    e = np.exp(_np(logits))
    np.testing.assert_allclose(p, e[:, 1] / e.sum(1), rtol=1e-5)
    with pytest.raises(ValueError, match="static map height and width"):
        VGGImageHead().compute_output_shape((None, None, None, 5))


def test_config_round_trip_and_save(small_classifier, tmp_path):
    x = _x((2, 288, 208, 1), seed=1)
    ref = _np(small_classifier(x, training=False))

    clone = keras.Model.from_config(small_classifier.get_config())
    clone.set_weights(small_classifier.get_weights())
    np.testing.assert_allclose(_np(clone(x, training=False)), ref, rtol=1e-5, atol=1e-6)

    backbone = small_classifier.get_layer("backbone")
    obj = keras.saving.serialize_keras_object(backbone)
    assert obj["registered_name"] == "mammodg>VGGBackbone"
    rebuilt = keras.saving.deserialize_keras_object(obj)
    assert isinstance(rebuilt, VGGBackbone) and rebuilt.get_config() == backbone.get_config()
    rebuilt.build((None, 288, 208, 1))
    rebuilt.set_weights(backbone.get_weights())
    np.testing.assert_allclose(_np(rebuilt(x)), _np(backbone(x)), rtol=1e-5, atol=1e-6)

    path = tmp_path / "classifier.keras"
    small_classifier.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(_np(loaded(x, training=False)), ref)


def test_load_backbone_weights(small_classifier):
    keras.utils.set_random_seed(1)
    patch = patch_classifier(width=W)
    _perturb_bn(patch, seed=2)
    source = patch.get_layer("backbone")
    target = small_classifier.get_layer("backbone")
    assert not np.allclose(source.get_weights()[0], target.get_weights()[0])
    head_before = [w.copy() for w in small_classifier.get_layer("image_head").get_weights()]

    assert load_backbone_weights(small_classifier, patch) is target
    for s, t in zip(source.weights, target.weights):
        assert s.path == t.path
        np.testing.assert_array_equal(_np(s), _np(t))
    for a, b in zip(head_before, small_classifier.get_layer("image_head").get_weights()):
        np.testing.assert_array_equal(a, b)

    # mismatched widths: clear errors naming the weight and both configurations
    wide = patch_classifier(width=1 / 8)
    msg = r"backbone mismatch at 'block1_conv/kernel'.*\(3, 3, 1, 2\).*\(3, 3, 1, 4\).*width=0\.125"
    with pytest.raises(ValueError, match=msg):
        load_backbone_weights(wide, patch)


def test_tiny_model_trains():
    """Bright square present (malignant) vs not: a few fit steps lower the loss."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n, size = 32, 192
    x = rng.normal(0.2, 0.05, (n, size, size, 1)).astype("float32")
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, size - 40, 2)
        x[i, r : r + 40, c : c + 40] = 1.0
    model = models.build("vgg_classifier", input_shape=(size, size, 1), width=W)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    hist = model.fit(x, y, batch_size=8, epochs=6, verbose=0, shuffle=True)
    loss = hist.history["loss"]
    assert np.all(np.isfinite(loss))
    assert loss[-1] < 0.8 * loss[0], loss


def test_registry():
    assert {"vgg_backbone", "vgg_classifier", "patch_classifier"} <= set(models.names())
    model = models.build("vgg_classifier", input_shape=(192, 192, 1), width=W)
    assert tuple(model.output_shape) == (None, 2)
    assert isinstance(models.build("vgg_backbone", width=W), VGGBackbone)
    with pytest.raises(KeyError, match="unknown model 'nope'.*patch_classifier.*vgg_backbone.*vgg_classifier"):
        models.build("nope")
    with pytest.raises(ValueError, match="already registered"):
        models.register("vgg_classifier")(lambda **kw: None)
