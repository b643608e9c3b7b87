"""``mammodg export``: the SavedModels of a training run, with fixed, documented serving signatures.

Every SavedModel has two signatures with the same named outputs (README "Export"):

- ``serve_images(images)``: ``uint16 (b, h, w, 1)``, the stored image batch exactly as written in the
  records (0 outside the breast, ``1 + round(65534 v)`` inside); the model input is made inside the
  graph with :func:`mammodg.records.schema.model_input`, so no client re-implements it;
- ``serve_examples(examples)``: ``string (b,)`` serialized records (one dataset: one image shape); also
  returns each record's ``image_id``.

The SavedModel needs TensorFlow only (no mammodg) to load and serve.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

SIGNATURES = ("serve_images", "serve_examples")
SAVED_MODEL_DIR = "saved_model"  # default ``out``: <run>/saved_model


def _need(path: Path, how: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {how}")
    return path


def _train_hint(run: Path, stage: str) -> str:
    return f"train the run first (mammodg train --stage {stage} --set run_dir={run})"


def _model_inputs(images, target_mean: float):
    """Stored uint16 batch -> float32 model inputs, each image with its own outside constant."""
    import tensorflow as tf

    from mammodg.records.schema import model_input

    return tf.map_fn(lambda s: model_input(s, target_mean), images, fn_output_signature=tf.float32)


def serving_module(models: dict, image_shape, outputs):
    """A ``tf.Module`` holding ``models`` (tracked, so their weights are saved) with the two signatures.

    ``outputs(images)`` maps a stored uint16 batch ``(b, *image_shape, 1)`` to a dict of named tensors;
    ``image_shape`` is ``(h, w)`` or ``(None, None)``.
    """
    import tensorflow as tf

    from mammodg.records.schema import parse

    image_spec = tf.TensorSpec([None, *image_shape, 1], tf.uint16, name="images")
    module = tf.Module()
    module.models = dict(models)

    @tf.function(input_signature=[image_spec])
    def serve_images(images):
        return outputs(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        def one(raw):
            r = parse(raw)
            return r["image"], r["image_id"]

        images, ids = tf.map_fn(one, examples, fn_output_signature=(
            tf.TensorSpec([None, None, 1], tf.uint16), tf.TensorSpec([], tf.string)))
        return {**outputs(tf.ensure_shape(images, image_spec.shape)), "image_id": ids}

    module.serve_images, module.serve_examples = serve_images, serve_examples
    return module


# ---------------------------------------------------------------------------------------- per stage
def _vgg(run: Path, cfg, name: str, input_shape):
    """The run's VGG-like model (``name`` in the registry) with its best EMA weights."""
    from mammodg import models

    model = models.build(name, input_shape=input_shape, width=cfg.vgg.width, filters=tuple(cfg.vgg.filters))
    model.load_weights(_need(run / "best.weights.h5", _train_hint(run, cfg.stage)))
    return model


def _patch(run: Path, cfg) -> dict:
    """Patch classes of whole stored images: the patch classifier's maximum score over every patch
    position of the image (a 224 patch is one position), and the map of per-position probabilities."""
    import keras
    import tensorflow as tf

    from mammodg import models

    model = _vgg(run, cfg, "patch_classifier", (cfg.patch.patch_size, cfg.patch.patch_size, 1))
    backbone = models.find_backbone(model)
    pool = model.get_layer("patch_logits")

    def outputs(images):
        scores = backbone(_model_inputs(images, cfg.target_mean), training=False)  # (b, h', w', 5) logits
        probs = keras.ops.softmax(pool(scores), axis=-1)
        return {"probabilities": probs, "patch_class": tf.argmax(probs, axis=-1, output_type=tf.int32),
                "probability_map": keras.ops.softmax(scores, axis=-1)}

    return {"": serving_module({"patch_classifier": model}, (None, None), outputs)}


def _classifier(run: Path, cfg) -> dict:
    """Malignancy of whole stored images (the input shape of the run's dataset, ``dataset.json``)."""
    import keras

    from mammodg import models
    from mammodg.records.reader import load_index

    h, w = load_index(cfg.data_dir)["image_shape"]
    model = _vgg(run, cfg, "vgg_classifier", (h, w, 1))

    def outputs(images):
        logits = model(_model_inputs(images, cfg.target_mean), training=False)
        return {"probability": models.malignancy_probability(logits),
                "probabilities": keras.ops.softmax(logits, axis=-1), "logits": logits}

    return {"": serving_module({"vgg_classifier": model}, (h, w), outputs)}


def encoder_size(input_size, crop_scale) -> tuple[int, int]:
    """(h, w) a whole image is resized to for the contrastive encoder: the scale of the training crops
    (a crop of ``mean(crop_scale)`` of the image area, ``sqrt`` of each side, resized to ``input_size``)."""
    side = math.sqrt(sum(crop_scale) / len(crop_scale))
    return tuple(max(1, round(n / side)) for n in input_size)


def _contrastive(run: Path, cfg) -> dict:
    """Image embeddings of the contrastive backbone: the whole image at the training-crop scale
    (:func:`encoder_size`), globally average-pooled (2048 features for ResNet-50)."""
    import tensorflow as tf

    from mammodg.models.resnet import build_backbone

    c = cfg.contrastive
    backbone = build_backbone(c.backbone, (None, None, 1), width=c.width)
    backbone.load_weights(_need(run / "backbone.weights.h5", _train_hint(run, "contrastive")))
    size = encoder_size(cfg.contrastive.input_size, cfg.contrastive.crop_scale)

    def outputs(images):
        x = tf.image.resize(_model_inputs(images, cfg.target_mean), size, method="bilinear", antialias=True)
        return {"embedding": backbone(x, training=False)}

    return {"": serving_module({"backbone": backbone}, (None, None), outputs)}


def _cyclegan(run: Path, cfg) -> dict:
    """One SavedModel per generator direction, in ``<src>__to__<dst>/``: stored images of style ``src``
    -> the same images in style ``dst``, as :meth:`mammodg.records.styles.StyleTransfer.transfer` does
    (generator in [-1, 1], -1 outside the breast, sides reflect-padded to multiples of 4 and cropped back)."""
    import keras
    import tensorflow as tf

    import mammodg.models  # noqa: F401  (registers the generator's layers)
    from mammodg.preprocess.stored import to_stored_tf, unit_values_tf
    from mammodg.records.styles import STYLES_JSON

    info = json.loads(_need(run / STYLES_JSON, _train_hint(run, "cyclegan")).read_text())
    out = {}
    for g in info["generators"]:
        generator = keras.models.load_model(_need(run / g["keras"], _train_hint(run, "cyclegan")))

        def outputs(images, generator=generator):
            mask = images > 0
            x = tf.where(mask, unit_values_tf(images) * 2.0 - 1.0, -1.0)
            h, w = tf.shape(x)[1], tf.shape(x)[2]
            x = tf.pad(x, [[0, 0], [0, -h % 4], [0, -w % 4], [0, 0]], mode="REFLECT")
            y = generator(x, training=False)[:, :h, :w]
            styled = tf.where(mask, tf.clip_by_value((y + 1.0) / 2.0, 0.0, 1.0), 0.0)
            return {"styled_image": to_stored_tf(styled, mask), "styled_image_float": styled}

        out[Path(g["keras"]).name.removesuffix(".keras")] = serving_module({"generator": generator}, (None, None), outputs)
    return out


def _trained(run: Path, cfg):
    """A downstream run's model (architecture from its ``last.keras``) with its best EMA weights."""
    import keras

    import mammodg.models  # noqa: F401  (registers the backbones' layers)

    model = keras.models.load_model(_need(run / "last.keras", _train_hint(run, cfg.stage)), compile=False)
    model.load_weights(_need(run / "best.weights.h5", _train_hint(run, cfg.stage)))
    return model


def _birads(run: Path, cfg) -> dict:
    """BI-RADS of lesion ROI crops. ``serve_images`` takes uint16 ``(b, s, s, 1)`` crops of the stored image
    (:func:`mammodg.augment.downstream.stored_roi_crops`: square, long side x 1.2, ``s = birads.crop_size``);
    ``serve_examples`` crops every box of each record itself (masses or not) and returns one row per box,
    with its record's ``image_id`` and the box's ``box_index``. ``birads_class`` indexes 2-3, 4A, 4B, 4C, 5."""
    import tensorflow as tf

    from mammodg.augment.downstream import crop_model_inputs, stored_roi_crops
    from mammodg.records.schema import parse

    model, c = _trained(run, cfg), cfg.birads

    def outputs(crops):
        probs = tf.nn.softmax(model(crop_model_inputs(crops, cfg.target_mean), training=False), axis=-1)
        return {"probabilities": probs, "birads_class": tf.argmax(probs, axis=-1, output_type=tf.int32)}

    module = serving_module({"birads_classifier": model}, (c.crop_size, c.crop_size), outputs)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve_examples(examples):
        crops = tf.TensorArray(tf.uint16, size=0, dynamic_size=True, infer_shape=False,
                               element_shape=[None, c.crop_size, c.crop_size, 1])
        ids = tf.TensorArray(tf.string, size=0, dynamic_size=True, infer_shape=False, element_shape=[None])
        index = tf.TensorArray(tf.int32, size=0, dynamic_size=True, infer_shape=False, element_shape=[None])
        for i in tf.range(tf.size(examples)):
            r = parse(examples[i])
            n = tf.shape(r["boxes"])[0]
            crops = crops.write(i, stored_roi_crops(r["image"], r["boxes"], c.crop_size, c.enlarge))
            ids = ids.write(i, tf.fill([n], r["image_id"]))
            index = index.write(i, tf.range(n))
        all_crops = tf.ensure_shape(crops.concat(), [None, c.crop_size, c.crop_size, 1])
        n = tf.shape(all_crops)[0]  # one blank crop appended: records without boxes give a non-empty batch
        scored = outputs(tf.concat([all_crops, tf.zeros([1, c.crop_size, c.crop_size, 1], tf.uint16)], 0))
        return {**{k: v[:n] for k, v in scored.items()}, "image_id": ids.concat(), "box_index": index.concat()}

    module.serve_examples = serve_examples
    return {"": module}


def _density(run: Path, cfg) -> dict:
    """Density of whole stored images (any size): ``probabilities`` over non-dense (A/B), dense (C/D) and
    ``dense`` (int32 0/1); the image is resized to ``density.input_size`` inside the graph."""
    import tensorflow as tf

    from mammodg.augment.downstream import density_input

    model, size = _trained(run, cfg), cfg.density.input_size

    def outputs(images):
        x = tf.map_fn(lambda s: density_input(s, size, cfg.target_mean), images,
                      fn_output_signature=tf.TensorSpec([*size, 1], tf.float32))
        probs = tf.nn.softmax(model(x, training=False), axis=-1)
        return {"probabilities": probs, "dense": tf.argmax(probs, axis=-1, output_type=tf.int32)}

    return {"": serving_module({"density_classifier": model}, (None, None), outputs)}


def _detection(run: Path, cfg) -> dict:
    """FCOS mass detections of whole stored images (the run's dataset shape), after class-wise NMS: ``boxes``
    (b, D, 4) x0, y0, x1, y1 in stored-image pixels, ``scores`` (b, D), ``classes`` (b, D) int32 (indices of
    ``detection.class_names()``) and ``num_detections`` (b,); rows past ``num_detections`` are zeros."""
    from mammodg.augment.detection import detect, load_detector
    from mammodg.records.reader import load_index

    shape = tuple(load_index(cfg.data_dir)["image_shape"])
    detector = load_detector(_need(run / "best.weights.h5", _train_hint(run, "detection")), cfg.detection)

    def outputs(images):
        return detect(detector, images, cfg.detection, stored_shape=shape, target_mean=cfg.target_mean)

    return {"": serving_module({"detector": detector}, shape, outputs)}


def _matching(run: Path, cfg) -> dict:
    """CC/MLO ROI pair matching: ``serve_pairs(roi_cc, roi_mlo: uint16 (b, s, s, 1) stored crops, geom_cc,
    geom_mlo: float32 (b, 3) geometric features)`` -> ``match_score`` (b,) in [0, 1] and ``distance`` (b,)."""
    import tensorflow as tf

    from mammodg.augment.matching_pairs import load_matcher, pair_outputs

    model, s = load_matcher(run, cfg), cfg.matching.roi_size
    module = tf.Module()
    module.models = {"matcher": model}
    roi = lambda n: tf.TensorSpec([None, s, s, 1], tf.uint16, name=n)  # noqa: E731
    geom = lambda n: tf.TensorSpec([None, 3], tf.float32, name=n)  # noqa: E731

    @tf.function(input_signature=[roi("roi_cc"), roi("roi_mlo"), geom("geom_cc"), geom("geom_mlo")])
    def serve_pairs(roi_cc, roi_mlo, geom_cc, geom_mlo):
        return pair_outputs(model, cfg, roi_cc, geom_cc, roi_mlo, geom_mlo)

    module.serve_pairs, module.signature_names = serve_pairs, ["serve_pairs"]
    return {"": module}


STAGE_EXPORTS = {"patch": _patch, "classifier": _classifier, "contrastive": _contrastive, "cyclegan": _cyclegan,
                 "detection": _detection, "matching": _matching, "birads": _birads, "density": _density}


# ---------------------------------------------------------------------------------------- writing
def describe(module) -> list[str]:
    """One line per signature: ``name(input: dtype[shape]) -> output: dtype[shape], ...``."""
    def spec(name, t):
        return f"{name}: {t.dtype.name}[{', '.join('?' if d is None else str(d) for d in t.shape.as_list())}]"

    lines = []
    for name in getattr(module, "signature_names", SIGNATURES):
        fn = getattr(module, name).get_concrete_function()
        inputs = ", ".join(spec(s.name, s) for s in fn.structured_input_signature[0])
        outputs = ", ".join(spec(k, t) for k, t in sorted(fn.structured_outputs.items()))
        lines.append(f"{name}({inputs}) -> {outputs}")
    return lines


def _save(module, path: Path) -> None:
    """tf.saved_model.save through a temporary folder renamed into place (never a half-written model)."""
    import tensorflow as tf

    from mammodg.io.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        names = getattr(module, "signature_names", SIGNATURES)  # a stage may serve other signatures (matching)
        tf.saved_model.save(module, str(tmp), signatures={k: getattr(module, k) for k in names})


def export_run(run_dir, out=None, log=print) -> list[Path]:
    """Write the SavedModel(s) of a training run (default ``<run>/saved_model``) and log their
    signatures; returns their folders. Stages call it at the end of training."""
    from mammodg.config import TrainConfig, load

    run = Path(run_dir)
    cfg = load(TrainConfig, _need(run / "config.yaml", "not a training run (mammodg train --stage S writes it)"))
    if cfg.stage not in STAGE_EXPORTS:
        raise ValueError(f"{run / 'config.yaml'}: stage {cfg.stage!r} has no export; known: {sorted(STAGE_EXPORTS)}")
    out = Path(out) if out else run / SAVED_MODEL_DIR
    paths = []
    for name, module in STAGE_EXPORTS[cfg.stage](run, cfg).items():
        path = out / name if name else out
        _save(module, path)
        log(f"SavedModel ({cfg.stage}): {path}")
        for line in describe(module):
            log(f"  {line}")
        paths.append(path)
    return paths
