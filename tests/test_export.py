"""``mammodg export``: every stage's SavedModel serves stored uint16 images and serialized records in a
fresh process with plain TensorFlow (mammodg cannot even be imported there) and matches the Keras model."""
import json
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from mammodg import models
from mammodg.cli import main
from mammodg.config import TrainConfig, save
from mammodg.preprocess.breast import from_stored, to_stored
from mammodg.records.reader import INDEX_FORMAT
from mammodg.records.schema import encode_example, encode_png16, model_input
from mammodg.records.styles import StyleTransfer
from mammodg.train import Task, Trainer

TOL = 1e-5

# Runs in a fresh interpreter: loads each SavedModel with plain TensorFlow and calls both signatures.
SERVE = textwrap.dedent("""
    import importlib.abc, json, sys

    class NoMammodg(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "mammodg":
                raise ImportError("the SavedModel must not need mammodg")

    sys.meta_path.insert(0, NoMammodg())
    import numpy as np
    import tensorflow as tf

    for job in json.loads(open(sys.argv[1]).read()):
        d = np.load(job["inputs"], allow_pickle=True)
        m = tf.saved_model.load(job["saved"])
        assert sorted(m.signatures) == ["serve_examples", "serve_images"], sorted(m.signatures)
        res = {f"images/{k}": v.numpy() for k, v in m.signatures["serve_images"](images=tf.constant(d["images"])).items()}
        ex = m.signatures["serve_examples"](examples=tf.constant(list(d["examples"])))
        res.update({f"examples/{k}": v.numpy() for k, v in ex.items()})
        np.savez(job["out"], **res)
    assert not any(k.split(".")[0] == "mammodg" for k in sys.modules)
""")


def stored_images(n, h, w, seed=0):
    """(n, h, w, 1) uint16 in the stored encoding: a half-disc breast on the left edge, random values
    inside (one pixel at v = 0, stored 1), 0 outside; sizes of the breast differ per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    out = []
    for i in range(n):
        r = (0.6 + 0.3 * i / max(n - 1, 1)) * min(h / 2, w)
        mask = (yy - h / 2) ** 2 + xx ** 2 < r * r
        v = rng.random((h, w)).astype(np.float32)
        v[h // 2, 0] = 0.0
        out.append(to_stored(v, mask))
    return np.stack(out)[..., None]


def records(images):
    """Serialized records of ``images`` (with image ids), encoded as the records writer encodes them."""
    return [encode_example({"image": encode_png16(img[..., 0]), "height": img.shape[0], "width": img.shape[1],
                            "image_id": f"img{i}"}) for i, img in enumerate(images)]


def serve(tmp_path, jobs):
    """{saved path: images} -> {saved path: outputs of serve_images and serve_examples}, from a fresh process."""
    spec = []
    for k, (saved, images) in enumerate(jobs.items()):
        inputs, out = tmp_path / f"in{k}.npz", tmp_path / f"out{k}.npz"
        np.savez(inputs, images=images, examples=np.array(records(images), dtype=object))
        spec.append({"saved": str(saved), "inputs": str(inputs), "out": str(out)})
    (tmp_path / "jobs.json").write_text(json.dumps(spec))
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for saved, job in zip(jobs, spec):
        with np.load(job["out"], allow_pickle=True) as d:  # image ids are bytes objects
            results[saved] = {k: d[k] for k in d.files}
    return results


def both(result, name, n):
    """An output from both signatures (they must agree); serve_examples also returns the image ids."""
    np.testing.assert_array_equal(result["examples/image_id"], [f"img{i}".encode() for i in range(n)])
    np.testing.assert_allclose(result[f"examples/{name}"], result[f"images/{name}"], rtol=0, atol=TOL)
    return result[f"images/{name}"]


def inputs(images, target_mean):
    """The documented model input of each stored image (its own outside constant)."""
    return np.stack([model_input(tf.constant(img), target_mean).numpy() for img in images])


def train_tiny(cfg, build):
    """Run the shared trainer for one step on random data: writes the run folder as every stage does."""
    x = np.random.default_rng(0).random((2, *build().input_shape[1:]), np.float32)
    task = Task(build_model=build, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                batches=lambda start: tf.data.Dataset.from_tensors((x, np.array([0, 1]))).repeat(),
                validate=lambda model: {"monitor": 0.0}, learning_rate=1e-2)
    return Trainer(cfg, cfg.run_dir, task).run()


def vgg_cfg(tmp_path, stage, patch_size=224, **kw):
    cfg = TrainConfig(stage=stage, run_dir=str(tmp_path / stage), steps=1, val_every=1, target_mean=0.3, **kw)
    cfg.vgg.width, cfg.vgg.filters, cfg.patch.patch_size = 0.125, [32, 32, 32], patch_size
    return cfg


def test_patch_export(tmp_path, capsys):
    cfg = vgg_cfg(tmp_path, "patch", patch_size=24)
    trained = train_tiny(cfg, lambda: models.build("patch_classifier", input_shape=(24, 24, 1), width=cfg.vgg.width,
                                                   filters=tuple(cfg.vgg.filters)))
    run = tmp_path / "patch"
    assert main(["export", "--run", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "serve_images(images: uint16[?, ?, ?, 1]) -> patch_class: int32[?], probabilities: float32[?, 5]" in printed
    patches, images = stored_images(3, 24, 24, seed=1), stored_images(2, 40, 32, seed=2)
    (tmp_path / "big").mkdir()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "big" / "sm")]) == 0
    res = serve(tmp_path, {run / "saved_model": patches, tmp_path / "big" / "sm": images})
    # a patch-sized image: the trained patch classifier itself
    expected = keras.ops.convert_to_numpy(keras.ops.softmax(trained(inputs(patches, 0.3)), axis=-1))
    out = res[run / "saved_model"]
    np.testing.assert_allclose(both(out, "probabilities", 3), expected, rtol=0, atol=TOL)
    np.testing.assert_array_equal(both(out, "patch_class", 3), expected.argmax(-1))
    # a whole image: the same classifier over every patch position (max score), and the per-position map
    whole = models.build("patch_classifier", input_shape=(None, None, 1), backbone=models.find_backbone(trained),
                         softmax=True)
    out = res[tmp_path / "big" / "sm"]
    x = inputs(images, 0.3)
    np.testing.assert_allclose(both(out, "probabilities", 2), keras.ops.convert_to_numpy(whole(x)), rtol=0, atol=TOL)
    scores = keras.ops.convert_to_numpy(keras.ops.softmax(models.find_backbone(trained)(x), axis=-1))
    assert both(out, "probability_map", 2).shape == (2, 3, 2, 5)
    np.testing.assert_allclose(out["images/probability_map"], scores, rtol=0, atol=TOL)


def test_classifier_export(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()  # the input shape comes from the run's dataset index
    (data / "dataset.json").write_text(json.dumps({"format": INDEX_FORMAT, "image_shape": [48, 32]}))
    cfg = vgg_cfg(tmp_path, "classifier", data_dir=str(data))
    trained = train_tiny(cfg, lambda: models.build("vgg_classifier", input_shape=(48, 32, 1), width=cfg.vgg.width,
                                                   filters=tuple(cfg.vgg.filters)))
    run = tmp_path / "classifier"
    assert main(["export", "--run", str(run)]) == 0
    assert ("serve_examples(examples: string[?]) -> image_id: string[?], logits: float32[?, 2], "
            "probabilities: float32[?, 2], probability: float32[?]") in capsys.readouterr().out
    images = stored_images(3, 48, 32, seed=3)
    out = serve(tmp_path, {run / "saved_model": images})[run / "saved_model"]
    logits = keras.ops.convert_to_numpy(trained(inputs(images, 0.3)))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(both(out, "logits", 3), logits, rtol=0, atol=TOL)
    np.testing.assert_allclose(both(out, "probabilities", 3), p, rtol=0, atol=TOL)
    np.testing.assert_allclose(both(out, "probability", 3), p[:, 1], rtol=0, atol=TOL)


def test_contrastive_export(tmp_path):
    from mammodg.export import encoder_size

    run = tmp_path / "contrastive"
    run.mkdir()
    cfg = TrainConfig(stage="contrastive", run_dir=str(run), target_mean=0.3)
    cfg.contrastive.input_size, cfg.contrastive.crop_scale = [32, 32], [0.25, 0.25]
    save(cfg, run / "config.yaml")  # as the trainer and the contrastive stage write them
    keras.utils.set_random_seed(0)
    backbone = models.build("resnet50_backbone", input_shape=(None, None, 1))  # same weights as at input_size
    backbone.save_weights(run / "backbone.weights.h5")
    assert main(["export", "--run", str(run)]) == 0
    # the whole image at the scale of the training crops: crops of 1/4 of the area (1/2 of each side)
    assert encoder_size([32, 32], [0.25, 0.25]) == (64, 64)
    assert encoder_size([512, 384], [0.6, 1.0]) == (572, 429)  # 512 / sqrt(0.8), 384 / sqrt(0.8)
    images = stored_images(2, 40, 30, seed=4)
    out = serve(tmp_path, {run / "saved_model": images})[run / "saved_model"]
    x = tf.image.resize(inputs(images, 0.3), (64, 64), method="bilinear", antialias=True)
    expected = keras.ops.convert_to_numpy(backbone(x))
    assert expected.shape == (2, 2048)
    scale = np.abs(expected).max()  # a random ResNet-50's features are small: tolerances relative to them
    np.testing.assert_allclose(both(out, "embedding", 2), expected, rtol=TOL, atol=TOL * scale)
    # the scale matters: the image resized to input_size instead gives other embeddings
    small = keras.ops.convert_to_numpy(backbone(tf.image.resize(inputs(images, 0.3), (32, 32), antialias=True)))
    assert np.abs(small - expected).max() > 100 * TOL * scale


def test_cyclegan_export(tmp_path):
    run = tmp_path / "cyclegan"
    (run / "generators").mkdir(parents=True)
    styles = ["PHANTOM|VendorA", "PHANTOM|VendorB"]
    save(TrainConfig(stage="cyclegan", run_dir=str(run)), run / "config.yaml")
    gens = []
    keras.utils.set_random_seed(0)
    for src, dst in [(0, 1), (1, 0)]:  # the cyclegan stage's layout and styles.json
        name = f"PHANTOM_Vendor{'AB'[src]}__to__PHANTOM_Vendor{'AB'[dst]}"
        models.build("cyclegan_generator", filters=4, n_blocks=1).save(run / "generators" / f"{name}.keras")
        gens.append({"src": styles[src], "dst": styles[dst], "keras": f"generators/{name}.keras"})
    (run / "styles.json").write_text(json.dumps({"styles": styles, "pairs": [styles], "generators": gens}))
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "served")]) == 0
    saved = [tmp_path / "served" / "PHANTOM_VendorA__to__PHANTOM_VendorB", tmp_path / "served" / "PHANTOM_VendorB__to__PHANTOM_VendorA"]
    images = stored_images(2, 30, 22, seed=5)  # sides not multiples of 4: padded for the generator, cropped back
    res = serve(tmp_path, {s: images for s in saved})
    transfer = StyleTransfer.load(run)
    v, mask = from_stored(images)
    for s, (src, dst) in zip(saved, [(0, 1), (1, 0)]):
        expected = transfer.transfer(v, mask, styles[src], styles[dst])
        styled = both(res[s], "styled_image_float", 2)
        np.testing.assert_allclose(styled, expected, rtol=0, atol=TOL)
        stored = res[s]["images/styled_image"]
        np.testing.assert_array_equal(res[s]["examples/styled_image"], stored)
        assert stored.dtype == np.uint16 and np.array_equal(stored > 0, images > 0)  # the breast mask is kept
        # the stored encoding of the styled values (1 + round(65534 v)): a rounding tie may flip by 1
        assert np.abs(stored.astype(int) - to_stored(expected, mask).astype(int)).max() <= 1
        np.testing.assert_allclose(from_stored(stored)[0], styled, rtol=0, atol=0.5 / 65534 + 1e-7)


def test_missing_run_or_weights_is_one_line_exit_2(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nowhere/config.yaml not found" in err and "mammodg train --stage" in err
    run = tmp_path / "patch"
    run.mkdir()
    save(TrainConfig(stage="patch", run_dir=str(run)), run / "config.yaml")
    assert main(["export", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "best.weights.h5 not found" in err and "mammodg train --stage patch" in err
    save(TrainConfig(stage="cyclegan", run_dir=str(run)), run / "config.yaml")
    assert main(["export", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "styles.json not found" in err and "mammodg train --stage cyclegan" in err
