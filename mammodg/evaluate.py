"""``mammodg evaluate``: a classifier run -> JSON + Markdown report and Figure 3/4-like PNGs; a contrastive
run -> style-invariance report (linear probe, t-SNE like MSVCL v2 Figure 7)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np


def evaluate_run(run: Path, *, split: str = "val", n_boot: int = 2000) -> dict:
    from mammodg import models
    from mammodg.config import TrainConfig, load
    from mammodg.metrics.classification import classification_report
    from mammodg.records.reader import load_index
    from mammodg.report import write_report
    from mammodg.stages.vgg_stages import image_scores

    cfg_path = run / "config.yaml"
    if not cfg_path.is_file() or not (run / "best.weights.h5").is_file():
        raise FileNotFoundError(f"{run} is not a finished training run (config.yaml / best.weights.h5 missing)")
    cfg = load(TrainConfig, cfg_path)
    if cfg.stage != "classifier":
        raise ValueError(f"{run}: evaluate reports image classifiers; this run is stage {cfg.stage!r}")
    h, w = load_index(cfg.data_dir)["image_shape"]
    model = models.build("vgg_classifier", input_shape=(h, w, 1), width=cfg.width, filters=tuple(cfg.filters))
    model.load_weights(run / "best.weights.h5")
    cfg.val_max_batches = 0
    p, y, segs = image_scores(model, cfg, split)
    report = classification_report(y, p, segs, n_boot=n_boot, seed=cfg.seed)
    history = json.loads((run / "history.json").read_text()) if (run / "history.json").is_file() else None
    return write_report(report, run / f"report_{split}", f"{run.name}: {split} split ({cfg.strategy} sampling)", history=history)


def _encoder_inputs(cfg, split: str, batch_size: int = 16, data_dir: str | None = None):
    """(images resized to the encoder input, styles) batches of every image of a split."""
    import tensorflow as tf

    from mammodg.sampling.streams import evaluation_records

    ds = evaluation_records(data_dir or cfg.data_dir, split, target_mean=cfg.target_mean, batch_size=batch_size)
    for x, _, seg in ds:
        yield tf.image.resize(x, cfg.contrastive.input_size, method="area"), [s.decode() for s in seg.numpy()]


def precise_batchnorm(model, batches) -> int:
    """Re-estimate every BatchNormalization's moving statistics as the mean of batch statistics over
    ``batches`` (no weight changes). A random network's (and a short run's) moving statistics are
    still near their initial (0, 1), which makes inference-mode embeddings degenerate. Returns the
    number of batches used."""
    import keras

    layers = [la for la in model._flatten_layers() if isinstance(la, keras.layers.BatchNormalization)]
    saved = [la.momentum for la in layers]
    k = 0
    for k, x in enumerate(batches, start=1):
        for la in layers:
            la.momentum = (k - 1) / k  # running mean of per-batch statistics
        model(x, training=True)
    for la, m in zip(layers, saved):
        la.momentum = m
    return k


def embed_images(backbone, cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Backbone embeddings (inference mode) of every image of a split, resized to the encoder input."""
    feats, styles = [], []
    for x, segs in _encoder_inputs(cfg, split):
        feats.append(np.asarray(backbone(x, training=False)))
        styles += segs
    return np.concatenate(feats), np.array(styles)


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Style accuracy of a logistic-regression probe, stratified k-fold over the images (k <= 5).

    Styles with fewer than 2 images cannot be held out and are dropped (listed in the result).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    names, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, names[counts >= 2])
    x, y = features[keep], labels[keep]
    k = int(min(5, np.unique(y, return_counts=True)[1].min()))
    if len(np.unique(y)) < 2:
        raise ValueError("the linear probe needs images of at least 2 styles with 2+ images each")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    acc = cross_val_score(probe, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
    return {"accuracy": float(acc.mean()), "folds": k, "images": int(keep.sum()),
            "chance": float(np.unique(y, return_counts=True)[1].max() / len(y)),
            "dropped_styles": [str(n) for n in names[counts < 2]]}


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


def evaluate_contrastive(run: Path, *, split: str = "val", data_dir: str | None = None) -> dict:
    """Style invariance of a contrastive backbone: linear-probe style accuracy (lower = more invariant)
    next to a randomly initialised backbone's, and a t-SNE figure coloured by style. Both backbones'
    BatchNorm statistics are first re-estimated on up to 256 training images (:func:`precise_batchnorm`)."""
    import keras

    from mammodg.config import TrainConfig, load
    from mammodg.models.resnet import resnet50_backbone

    cfg = load(TrainConfig, run / "config.yaml")
    bn_images = cfg.data_dir  # BatchNorm statistics always from the run's own training images
    if data_dir:  # held-out images from another dataset (e.g. new patients)
        cfg = load(TrainConfig, run / "config.yaml", [f"data_dir={data_dir}"])
    weights = run / "backbone.weights.h5"
    if cfg.stage != "contrastive" or not weights.is_file():
        raise FileNotFoundError(f"{run} is not a finished contrastive run (backbone.weights.h5 missing)")
    shape = (*cfg.contrastive.input_size, 1)
    trained = resnet50_backbone(shape)
    trained.load_weights(weights)
    keras.utils.set_random_seed(cfg.seed)
    random = resnet50_backbone(shape)
    for model in (trained, random):  # BN statistics from (unlabelled) training images, both backbones alike
        precise_batchnorm(model, (x for x, _ in itertools.islice(_encoder_inputs(cfg, cfg.train_split, 32, bn_images), 8)))
    f_trained, styles = embed_images(trained, cfg, split)
    f_random, _ = embed_images(random, cfg, split)
    out = run / (f"invariance_{split}" if not data_dir else f"invariance_{Path(data_dir).name}_{split}")
    out.mkdir(exist_ok=True)
    result = {
        "run": str(run), "data_dir": cfg.data_dir, "split": split, "method": cfg.contrastive.method,
        "images_per_style": {str(k): int(v) for k, v in zip(*np.unique(styles, return_counts=True))},
        "probe_trained": linear_probe_accuracy(f_trained, styles, cfg.seed),
        "probe_random_init": linear_probe_accuracy(f_random, styles, cfg.seed),
    }
    plot_tsne({f"{cfg.contrastive.method} (trained)": f_trained, "random init": f_random}, styles, out / "tsne.png", cfg.seed)
    (out / "invariance.json").write_text(json.dumps(result, indent=1))
    t, r = result["probe_trained"], result["probe_random_init"]
    (out / "invariance.md").write_text(
        f"# Style invariance: {run.name} ({cfg.contrastive.method}), {split} split\n\n"
        f"Linear-probe vendor-style accuracy on frozen embeddings ({t['folds']}-fold, {t['images']} images; "
        f"lower = more style-invariant; chance {t['chance']:.3f}):\n\n"
        f"| backbone | style accuracy |\n|---|---|\n| {cfg.contrastive.method} | {t['accuracy']:.3f} |\n"
        f"| random init | {r['accuracy']:.3f} |\n\n![t-SNE](tsne.png)\n")
    return {"json": out / "invariance.json", "markdown": out / "invariance.md", "tsne": out / "tsne.png",
            "style_accuracy": round(t["accuracy"], 4), "style_accuracy_random_init": round(r["accuracy"], 4)}
