"""``mammodg evaluate``: a classifier run -> JSON + Markdown report and Figure 3/4-like PNGs; a contrastive
run -> style-invariance report (linear probe, t-SNE like MSVCL v2 Figure 7)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def evaluate_run(run: Path, *, split: str = "val", n_boot: int = 2000) -> dict:
    from mammodg import models
    from mammodg.config import TrainConfig, load
    from mammodg.metrics.classification import classification_report
    from mammodg.models.predict import class_probabilities
    from mammodg.records.reader import load_index
    from mammodg.report import write_report
    from mammodg.sampling.streams import evaluation_records

    cfg_path = run / "config.yaml"
    if not cfg_path.is_file() or not (run / "best.weights.h5").is_file():
        raise FileNotFoundError(f"{run} is not a finished training run (config.yaml / best.weights.h5 missing)")
    cfg = load(TrainConfig, cfg_path)
    if cfg.stage != "classifier":
        raise ValueError(f"{run}: evaluate reports image classifiers; this run is stage {cfg.stage!r}")
    h, w = load_index(cfg.data_dir)["image_shape"]
    model = models.build("vgg_classifier", input_shape=(h, w, 1), width=cfg.vgg.width, filters=tuple(cfg.vgg.filters))
    model.load_weights(run / "best.weights.h5")
    probs, y, segs = class_probabilities(model, evaluation_records(cfg.data_dir, split, target_mean=cfg.target_mean,
                                                                   batch_size=cfg.batch_size))
    report = classification_report(y, probs[:, 1], segs, n_boot=n_boot, seed=cfg.seed)
    history = json.loads((run / "history.json").read_text()) if (run / "history.json").is_file() else None
    return write_report(report, run / f"report_{split}", f"{run.name}: {split} split ({cfg.strategy} sampling)", history=history)


def stored_images(data_dir, split: str):
    """(stored image (h, w) uint16, data segment, patient pseudonym) of every record of a split of image
    records."""
    import tensorflow as tf

    from mammodg.records.reader import all_shards, load_index
    from mammodg.records.schema import parse

    for raw in tf.data.TFRecordDataset(sorted(all_shards(load_index(data_dir), data_dir, split))):
        r = parse(raw)
        yield r["image"].numpy()[..., 0], r["data_segment"].numpy().decode(), r["patient"].numpy().decode()


def precise_batchnorm(model, batches) -> int:
    """Re-estimate every BatchNormalization's moving statistics as the mean of batch statistics over
    ``batches`` (no weight changes). Returns the number of batches used."""
    import keras

    def nested(layer):
        for la in getattr(layer, "layers", []):
            yield la
            yield from nested(la)

    layers = list({id(la): la for la in nested(model) if isinstance(la, keras.layers.BatchNormalization)}.values())
    saved = [la.momentum for la in layers]
    k = 0
    for k, x in enumerate(batches, start=1):
        for la in layers:
            la.momentum = (k - 1) / k  # running mean of per-batch statistics
        model(x, training=True)
    for la, m in zip(layers, saved):
        la.momentum = m
    return k


def _tiles(cfg, stored: np.ndarray) -> np.ndarray:
    """:func:`mammodg.augment.evaluation_tiles` of a stored image at a contrastive run's training scale."""
    from mammodg.augment import evaluation_tiles

    c = cfg.contrastive
    return evaluation_tiles(stored, input_size=c.input_size, crop_scale=c.crop_scale, target_mean=cfg.target_mean,
                            pair_size=c.pair_size)


def _tile_batches(cfg, split: str, batch: int = 32, max_batches: int = 8):
    """Batches of evaluation tiles of a split's images (for BatchNorm statistics)."""
    pending, n = [], 0
    for stored, *_ in stored_images(cfg.data_dir, split):
        pending.extend(_tiles(cfg, stored))
        while len(pending) >= batch and n < max_batches:
            yield np.stack(pending[:batch])
            pending, n = pending[batch:], n + 1
        if n >= max_batches:
            return
    if len(pending) >= 2:  # a small split: the rest (BatchNorm needs 2+ samples)
        yield np.stack(pending)


def embed_images(backbones: dict, cfg, split: str, data_dir=None, chunk_tiles: int = 512,
                 batch: int = 64) -> tuple[dict, np.ndarray]:
    """Image embeddings of every image of a split for each backbone (name -> model, inference mode):
    the mean of the backbone's embeddings of the image's breast tiles at the training scale
    (:func:`mammodg.augment.evaluation_tiles`), run in batches of tiles of several images.
    A model with a dict of outputs gives one embedding per output name (one pass for several).
    Returns (name -> (n, d), styles (n,), patients (n,))."""
    feats, styles, patients, tiles, owner = {}, [], [], [], []

    def flush():
        if tiles:
            x, who = np.concatenate(tiles), np.asarray(owner)
            x = np.concatenate([x, np.zeros((-len(x) % batch, *x.shape[1:]), x.dtype)])  # whole batches: no retracing
            for name, model in backbones.items():
                out = model.predict(x, batch_size=batch, verbose=0)
                for key, f in (out if isinstance(out, dict) else {name: out}).items():
                    feats.setdefault(key, []).extend(f[:len(who)][who == i].mean(axis=0) for i in np.unique(who))
            tiles.clear()
            owner.clear()

    for i, (stored, segment, patient) in enumerate(stored_images(data_dir or cfg.data_dir, split)):
        t = _tiles(cfg, stored)
        tiles.append(t)
        owner.extend([i] * len(t))
        styles.append(segment)
        patients.append(patient)
        if len(owner) >= chunk_tiles:
            flush()
    flush()
    if not styles:
        raise ValueError(f"split {split!r} of {data_dir or cfg.data_dir} has no images")
    return {k: np.stack(v) for k, v in feats.items()}, np.array(styles), np.array(patients)


def _patients_per_style(labels: np.ndarray, groups: np.ndarray) -> dict:
    return {n: len(np.unique(groups[labels == n])) for n in np.unique(labels)}


def probe_folds(labels: np.ndarray, groups: np.ndarray, seed: int = 0) -> list:
    """(train, test) index arrays of k <= 5 folds grouped by patient (``groups``), stratified by style
    (StratifiedGroupKFold): a patient's images are never on both sides, so a probe cannot score by
    recognising the patient. k is at most the fewest patients of any style."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = int(min(5, *_patients_per_style(labels, groups).values()))
    return list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(labels, labels, groups))


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, groups=None, seed: int = 0) -> dict:
    """Style accuracy of a logistic-regression probe, k-fold over the images grouped by patient
    (``groups``, one per image; None: every image its own patient), :func:`probe_folds`.

    Styles with fewer than 2 patients cannot be held out and are dropped (listed in the result).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    per_style = _patients_per_style(labels, groups)
    dropped = [n for n, c in per_style.items() if c < 2]
    keep = ~np.isin(labels, dropped)
    x, y, g = features[keep], labels[keep], groups[keep]
    if len(np.unique(y)) < 2:
        raise ValueError("the linear probe needs images of at least 2 styles with 2+ patients each")
    folds = probe_folds(y, g, seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    acc = cross_val_score(probe, x, y, cv=folds)
    return {"accuracy": float(acc.mean()), "folds": len(folds), "images": int(keep.sum()), "patients": int(len(np.unique(g))),
            "chance": float(np.unique(y, return_counts=True)[1].max() / len(y)),
            "dropped_styles": [str(n) for n in dropped]}


def plot_tsne(panels: dict, styles: np.ndarray, path: Path, seed: int = 0) -> Path:
    """t-SNE of embeddings coloured by vendor style, one panel per backbone (MSVCL v2 Figure 7)."""
    from sklearn.manifold import TSNE

    from mammodg.report import _colours, _new_figure

    names = sorted(set(styles))
    colours = dict(zip(names, _colours(len(names))))
    fig = _new_figure((5 * len(panels), 4.6))
    for i, (title, feats) in enumerate(panels.items()):
        xy = TSNE(2, perplexity=max(2.0, min(30.0, (len(feats) - 1) / 3)), init="pca",
                  random_state=seed).fit_transform(feats)
        ax = fig.add_subplot(1, len(panels), i + 1)
        for n in names:
            m = styles == n
            ax.scatter(xy[m, 0], xy[m, 1], s=14, color=colours[n], label=n, alpha=0.8)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[0].legend(fontsize=7, loc="best")
    fig.savefig(path)
    return path


def evaluate_contrastive(run: Path, *, split: str = "val", data_dir: str | None = None, baselines: bool = True,
                         reuse: bool = False) -> dict:
    """Style invariance of a contrastive backbone: linear-probe style accuracy (lower = more invariant)
    next to a randomly initialised backbone's, and a t-SNE figure coloured by style.

    Each image is embedded at the scale the encoder was trained on (the mean of its breast tiles'
    embeddings, :func:`embed_images`). Two random baselines share the trained backbone's architecture
    and seed: as initialised (BatchNorm statistics 0/1), and with BatchNorm statistics re-estimated on
    the run's training images (:func:`precise_batchnorm`), as a trained backbone's are. The second
    separates what training the weights did from what data-calibrated BatchNorm alone does (it puts a
    random ResNet-50 in a chaotic regime whose pooled features carry less of the input's style).
    ``baselines=False`` skips both (an experiment that already has them for this seed and architecture);
    ``reuse`` returns the figures of an earlier evaluation of the same images when it has every backbone asked."""
    import keras

    from mammodg.config import TrainConfig, load
    from mammodg.models.resnet import build_backbone

    cfg = load(TrainConfig, run / "config.yaml")
    weights = run / "backbone.weights.h5"
    if cfg.stage != "contrastive" or not weights.is_file():
        raise FileNotFoundError(f"{run} is not a finished contrastive run (backbone.weights.h5 missing)")
    shape = (*cfg.contrastive.input_size, 1)
    out = run / (f"invariance_{split}" if not data_dir else f"invariance_{Path(data_dir).name}_{split}")
    head = (run / "best.weights.h5").is_file()  # the whole model (backbone + projection head) of the run
    rows = [r for r in _INVARIANCE_ROWS if (baselines or not r[0].startswith("random")) and (head or r[0] != "head")]
    if reuse and (out / "invariance.json").is_file() and (
            (out / "invariance.json").stat().st_mtime > (run / "history.json").stat().st_mtime):  # not retrained since
        result = json.loads((out / "invariance.json").read_text())
        if all(key in result for _, key, _ in rows):
            return _invariance_summary(out, result)

    def backbone():
        return build_backbone(cfg.contrastive.backbone, shape, width=cfg.contrastive.width)

    if head:  # one backbone pass gives both: {"trained": its features, "head": the projection of them}
        models = {"trained": backbone_and_head(cfg, run / "best.weights.h5")}
    else:
        models = {"trained": backbone()}
        models["trained"].load_weights(weights)
    if baselines:
        keras.utils.set_random_seed(cfg.seed)
        models["random"], models["random_bn"] = backbone(), backbone()
        models["random_bn"].set_weights(models["random"].get_weights())
        precise_batchnorm(models["random_bn"], _tile_batches(cfg, cfg.train_split))
    feats, styles, patients = embed_images(models, cfg, split, data_dir)
    out.mkdir(exist_ok=True)
    result = {
        "run": str(run), "data_dir": str(data_dir or cfg.data_dir), "split": split, "method": cfg.contrastive.method,
        "images_per_style": {str(k): int(v) for k, v in zip(*np.unique(styles, return_counts=True))},
        **{key: linear_probe_accuracy(feats[name], styles, patients, cfg.seed) for name, key, _ in rows},
    }
    method = cfg.contrastive.method
    plot_tsne({row.format(method=method): feats[name] for name, _, row in rows}, styles, out / "tsne.png", cfg.seed)
    (out / "invariance.json").write_text(json.dumps(result, indent=1))
    probe = result["probe_trained"]
    table = "".join(f"| {row.format(method=method)} | {result[key]['accuracy']:.3f} |\n" for _, key, row in rows)
    (out / "invariance.md").write_text(
        f"# Style invariance: {run.name} ({cfg.contrastive.method}), {split} split\n\n"
        f"Linear-probe vendor-style accuracy on frozen embeddings ({probe['folds']}-fold grouped by patient, "
        f"{probe['images']} images of {probe['patients']} patients; "
        f"lower = more style-invariant; chance {probe['chance']:.3f}):\n\n"
        f"| backbone | style accuracy |\n|---|---|\n{table}\n![t-SNE](tsne.png)\n")
    return _invariance_summary(out, result)


def backbone_and_head(cfg, weights) -> "keras.Model":
    """Tile -> {"trained": the backbone's features, "head": the projection head's output of them (what
    NT-Xent compared in training)} of a contrastive run's model, built as the stage builds it and loaded
    from ``weights`` (its ``best.weights.h5``). A style the backbone keeps may be dropped by the head alone
    (the head absorbs the invariances the loss asks for)."""
    import keras

    from mammodg.models.resnet import backbone_of
    from mammodg.stages.contrastive import contrastive_task

    model = contrastive_task(cfg).build_model()
    model.load_weights(weights)
    x = keras.Input((*cfg.contrastive.input_size, 1))
    features = backbone_of(model)(x)
    return keras.Model(x, {"trained": features, "head": model.get_layer("projection")(features)})


def projection_encoder(cfg, weights) -> "keras.Model":
    """Tile -> the projection head's output alone (:func:`backbone_and_head`)."""
    import keras

    both = backbone_and_head(cfg, weights)
    return keras.Model(both.input, both.output["head"], name="projection_encoder")


# (model, invariance.json key, table row and t-SNE title) of each embedding evaluate_contrastive probes
_INVARIANCE_ROWS = (("trained", "probe_trained", "{method}"), ("head", "probe_projection", "{method}, projection head output"),
                    ("random", "probe_random_init", "random init"),
                    ("random_bn", "probe_random_init_data_bn", "random init, BatchNorm statistics from the training images"))


def _invariance_summary(out: Path, result: dict) -> dict:
    """evaluate_contrastive's return value: the report's paths and each probed backbone's style accuracy."""
    short = {"probe_trained": "style_accuracy", "probe_projection": "style_accuracy_projection",
             "probe_random_init": "style_accuracy_random_init",
             "probe_random_init_data_bn": "style_accuracy_random_init_data_bn"}
    return {"json": out / "invariance.json", "markdown": out / "invariance.md", "tsne": out / "tsne.png",
            **{short[key]: round(result[key]["accuracy"], 4) for key in short if key in result}}


def evaluate_downstream(run: Path, *, split: str = "val", data_dir: str | None = None, n_boot: int = 2000) -> dict:
    """A birads or density run: accuracy per domain (data segment) of ``split`` of its own records or of
    ``data_dir``, with seen / unseen averages, bootstrap CIs and the majority-class rate
    (:func:`mammodg.metrics.accuracy.accuracy_report`). Seen domains: the segments of the run's training split."""
    from mammodg.config import TrainConfig, load
    from mammodg.io.atomic import atomic_write_json
    from mammodg.metrics.accuracy import accuracy_report, format_accuracy_table
    from mammodg.records.reader import load_index
    from mammodg.stages import birads, density

    cfg_path = Path(run) / "config.yaml"
    if not cfg_path.is_file() or not (Path(run) / "best.weights.h5").is_file():
        raise FileNotFoundError(f"{run} is not a finished training run (config.yaml / best.weights.h5 missing)")
    cfg = load(TrainConfig, cfg_path)
    stages = {"birads": (birads.build_birads_model, birads.birads_predictions),
              "density": (density.build_density_model, density.density_predictions)}
    if cfg.stage not in stages:
        raise ValueError(f"{run}: this run is stage {cfg.stage!r}, not birads or density")
    build, predict = stages[cfg.stage]
    model = build(cfg)
    model.load_weights(Path(run) / "best.weights.h5")
    probs, y, segs = predict(model, cfg, split, data_dir)
    seen = sorted(load_index(cfg.data_dir)["splits"].get(cfg.train_split, {}))
    report = accuracy_report(y, probs.argmax(axis=1) if len(y) else y, segs, seen, n_boot=n_boot, seed=cfg.seed)
    out = Path(run) / (f"accuracy_{split}" if not data_dir else f"accuracy_{Path(data_dir).name}_{split}")
    out.mkdir(exist_ok=True)
    atomic_write_json(out / "accuracy.json", {"run": Path(run).name, "stage": cfg.stage, "split": split,
                                              "seen_domains": seen, **report})
    title = f"{cfg.stage} accuracy: {Path(run).name}, {split} split" + (f" of {Path(data_dir).name}" if data_dir else "")
    (out / "accuracy.md").write_text(format_accuracy_table(report, title))
    g = report["global"]
    return {"json": out / "accuracy.json", "markdown": out / "accuracy.md", "accuracy": g["accuracy"],
            "majority_rate": g["majority_rate"]}


def evaluate_detection(run: Path, *, split: str = "val", data_dir: str | None = None, overlays: int = 8) -> dict:
    """A detection run on a split (of its own data or of ``data_dir``): AP@0.5 and COCO mAP (pycocotools,
    images without findings included), FROC at 0.5/1/2/4 FP per image, the Table II per-domain rows with
    seen (the run's train-split segments) and unseen (the other evaluated segments) averages, and a
    Figure 8-like overlay PNG of the first ``overlays`` images with a lesion."""
    from mammodg.augment.detection import load_detector
    from mammodg.config import TrainConfig, load
    from mammodg.metrics.detection_report import plot_overlays, write_detection_report
    from mammodg.records.reader import load_index
    from mammodg.stages.detection import detections

    cfg = load(TrainConfig, run / "config.yaml")
    if cfg.stage != "detection" or not (run / "best.weights.h5").is_file():
        raise FileNotFoundError(f"{run} is not a finished detection run (config.yaml / best.weights.h5 missing)")
    detector = load_detector(run / "best.weights.h5", cfg.detection)
    ims = detections(detector, cfg, split, data_dir=data_dir, keep_images=overlays)
    trained_on = set(load_index(cfg.data_dir)["splits"].get(cfg.train_split, {}))
    present = sorted({im["domain"] for im in ims})
    seen, unseen = [d for d in present if d in trained_on], [d for d in present if d not in trained_on]
    out = run / (f"detection_{split}" if not data_dir else f"detection_{Path(data_dir).name}_{split}")
    paths = write_detection_report([{k: v for k, v in im.items() if k != "image"} for im in ims], out,
                                   title=f"{run.name}: {split} split", seen=seen, unseen=unseen, method=run.name)
    panels = [{**im, "title": im["domain"]} for im in ims if "image" in im]
    if panels:
        paths["overlays"] = plot_overlays(panels, out / "overlays.png", score_threshold=cfg.detection.score_threshold)
    g = paths.pop("report")["global"]
    return {**paths, "ap50": g["ap50"], "map": g["map"]}


def evaluate_matching(run: Path, *, split: str = "val") -> dict:
    """A matching run on a split: matching accuracy of its CC/MLO candidate pairs at ``match_score > 0.5``
    (chance: 0.5 on balanced pairs; per class too), and detection AP@0.5 of the candidates before and after
    raising each candidate's score by its best match in the other view (``matching.rescore_boost``).
    Writes ``matching_<split>/report.json``."""
    from mammodg.augment.matching_pairs import rescore
    from mammodg.config import TrainConfig, load
    from mammodg.io.atomic import atomic_write_json
    from mammodg.metrics.detection import average_precision
    from mammodg.augment.matching_pairs import load_matcher, match_score
    from mammodg.stages.matching import domain_scores, matching_data, pair_distances, pair_scores

    cfg = load(TrainConfig, run / "config.yaml")
    if cfg.stage != "matching":
        raise FileNotFoundError(f"{run} is not a matching run (config.yaml stage {cfg.stage!r})")
    model, data = load_matcher(run, cfg), matching_data(cfg, split, run_dir=run)
    d = pair_distances(model, cfg, data)
    best = np.zeros(len(data["rois"]))
    score = np.asarray(match_score(d, cfg.matching.margin))
    np.maximum.at(best, data["a"], score)
    np.maximum.at(best, data["b"], score)
    ap = lambda ims: average_precision(ims, iou_thresholds=(0.5,))["ap50"]  # noqa: E731
    before, after = ap(data["images"]), ap(rescore(data["images"], best, cfg.matching.rescore_boost))
    report = {**pair_scores(d, data["y"], cfg.matching.margin), "chance_accuracy": 0.5,
              "ap50_before": before, "ap50_after": after, "ap50_change": after - before, "images": len(data["images"]),
              "domains": domain_scores(d, data, cfg.matching.margin)}
    out = run / f"matching_{split}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    return {"report": out / "report.json", **report}
