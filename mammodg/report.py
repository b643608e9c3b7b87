"""Evaluation reports: ROC figure (paper Fig. 4), validation curves (Fig. 3), Markdown and JSON.

Works on the dict produced by :func:`mammodg.metrics.classification_report`. Figures are drawn with
matplotlib's object API on an Agg canvas (no pyplot, no global backend change, no TensorFlow).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from mammodg.metrics.classification import none_if_nan

__all__ = ["plot_roc", "plot_validation_curves", "markdown_report", "write_report", "to_jsonable", "style_grid"]

BLEND_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # MSVCL v2 eq. (2): 0.0, 0.1, ..., 1.0

_OP_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_METRIC_LABELS = {"wll": "WLL / image", "auc": "AUC / image"}


def _colours(k: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


def _new_figure(figsize, layout="constrained") -> Figure:
    fig = Figure(figsize=figsize, dpi=110, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _num(x) -> float:
    return float("nan") if x is None else float(x)


# ------------------------------------------------------------------------------------------- ROC
def plot_roc(report: dict, path, title: str | None = None) -> Path:
    """ROC curves as in the paper's Figure 4: global curve in black, one coloured curve per segment.

    The operating points of every curve (``report["thresholds"]``, 0.2/0.4/0.6/0.8 by default) are
    marked with one marker shape per threshold and annotated with the threshold; the legend gives each
    curve's AUC [95 % CI] and the marker of each threshold. Segments without a ROC curve (single class)
    are listed in the legend with their note. Returns the written path.
    """
    path = Path(path)
    thresholds = list(report.get("thresholds") or [])
    segs = report.get("segments") or {}
    groups = [("Global", report["global"], "black", 2.2)]
    groups += [(name, g, c, 1.6) for (name, g), c in zip(segs.items(), _colours(len(segs)))]

    fig = _new_figure((6.4, 6.2), layout=None)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", zorder=0)
    curve_handles = []
    for gi, (name, g, colour, lw) in enumerate(groups):
        n_lab = f"n={g['n']}, pos={g['n_pos']}"
        if g.get("roc") is None or g.get("auc") is None:
            h = Line2D([], [], color=colour, lw=lw, ls=":", label=f"{name}: AUC n/a ({n_lab})")
            curve_handles.append(h)
            continue
        ci = g.get("auc_ci") or [None, None]
        ci_txt = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None and ci[1] is not None else ""
        (h,) = ax.plot(g["roc"]["fpr"], g["roc"]["tpr"], color=colour, lw=lw, zorder=3 if gi == 0 else 2,
                       label=f"{name}: AUC {g['auc']:.3f}{ci_txt} ({n_lab})")
        curve_handles.append(h)
        for k, op in enumerate(g.get("operating_points") or []):
            fx, ty = _num(op["fpr"]), _num(op["tpr"])
            if not (math.isfinite(fx) and math.isfinite(ty)):
                continue
            ax.plot([fx], [ty], marker=_OP_MARKERS[k % len(_OP_MARKERS)], ms=7, mfc=colour, mec="white",
                    mew=0.9, ls="none", zorder=4)
            ax.annotate(f"{op['threshold']:g}", (fx, ty), xytext=(5, -10), textcoords="offset points",
                        fontsize=7, color=colour, zorder=5)
    op_handles = [Line2D([], [], marker=_OP_MARKERS[k % len(_OP_MARKERS)], ls="none", mfc="0.45", mec="white",
                         ms=7, label=f"OP at threshold {t:g}") for k, t in enumerate(thresholds)]
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(True, lw=0.4, alpha=0.5)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title or "ROC curves: global (black) and per data segment")
    spacer = Line2D([], [], ls="none", label=" ")
    ax.legend(handles=curve_handles + ([spacer] + op_handles if op_handles else []), loc="upper left",
              bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, fontsize=8, frameon=False,
              title="Curve: AUC [95% CI]", title_fontsize=8.5, alignment="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.15)  # the canvas grows to hold the outside legend
    return path


# ----------------------------------------------------------------------------- validation curves
def plot_validation_curves(history: Sequence[dict], path, metric_keys: Sequence[str] = ("wll", "auc"),
                           title: str | None = None) -> Path:
    """Validation metrics versus training step, as in the paper's Figure 3.

    ``history``: ``[{"step": int, "global": {"wll": .., "auc": ..}, "segments": {"S1|A": {...}, ...}}, ...]``.
    One subplot per metric key; global metric in black, each segment in its own colour (segments are
    the union over the history; missing / ``None`` values leave gaps). Returns the written path.
    """
    path = Path(path)
    hist = sorted(history, key=lambda h: h["step"])
    steps = np.array([h["step"] for h in hist], dtype=float)
    seg_names: list[str] = []
    for h in hist:
        for name in (h.get("segments") or {}):
            if name not in seg_names:
                seg_names.append(name)
    seg_names.sort()
    colours = dict(zip(seg_names, _colours(len(seg_names))))

    def series(getter, key):
        return np.array([_num((getter(h) or {}).get(key)) for h in hist], dtype=float)

    k = len(metric_keys)
    fig = _new_figure((4.6 * k + 0.4, 4.0))
    axes = fig.subplots(1, k, squeeze=False)[0]
    handles = []
    for j, (ax, key) in enumerate(zip(axes, metric_keys)):
        (hg,) = ax.plot(steps, series(lambda h: h.get("global"), key), color="black", lw=2.0, marker=".",
                        ms=4, label="Global", zorder=3)
        if j == 0:
            handles.append(hg)
        for name in seg_names:
            (hs,) = ax.plot(steps, series(lambda h, n=name: (h.get("segments") or {}).get(n), key),
                            color=colours[name], lw=1.4, marker=".", ms=3, label=name)
            if j == 0:
                handles.append(hs)
        label = _METRIC_LABELS.get(key, key)
        ax.set_title(f"Validation {label}")
        ax.set_xlabel("Training step")
        ax.set_ylabel(label)
        ax.grid(True, lw=0.4, alpha=0.5)
    if title:
        fig.suptitle(title)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------- markdown
def _fmt(x, nd=4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _md_cell(text) -> str:
    """Escape characters that would break a GFM table cell (segment names such as ``S1|VendorA``)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_report(report: dict, title: str) -> str:
    """Markdown summary: one table with a row per group (global, then every segment).

    Columns: segment, n, positives, WLL, AUC [95% CI], and for every threshold the operating point as
    ``TPR / FPR``. Notes (e.g. single-class segments) follow the table.
    """
    thresholds = list(report.get("thresholds") or [])
    groups = [("**Global**", report["global"])] + [(f"`{_md_cell(k)}`", v) for k, v in (report.get("segments") or {}).items()]
    head = ["Segment", "n", "Positives", "WLL", "AUC [95% CI]"] + [f"OP@{t:g} TPR / FPR" for t in thresholds]
    lines = [f"# {title}", "",
             f"Bootstrap: {report.get('n_boot')} resamples (seed {report.get('seed')}), 95% percentile CI. "
             "OP@t: predict malignant when score >= t; TPR = sensitivity, FPR = 1 - specificity.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    notes = []
    for name, g in groups:
        if g.get("auc") is None:
            auc_txt = "n/a"
        else:
            ci = g.get("auc_ci") or [None, None]
            auc_txt = f"{_fmt(g['auc'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]"
        ops = {round(op["threshold"], 9): op for op in (g.get("operating_points") or [])}
        op_cells = []
        for t in thresholds:
            op = ops.get(round(t, 9))
            op_cells.append("n/a" if op is None else f"{_fmt(op['tpr'], 3)} / {_fmt(op['fpr'], 3)}")
        row = [name, str(g["n"]), str(g["n_pos"]), _fmt(g.get("wll")), auc_txt] + op_cells
        lines.append("| " + " | ".join(row) + " |")
        if g.get("note"):
            notes.append(f"- {name}: {g['note']}")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- files
def to_jsonable(obj):
    """Recursively convert numpy scalars/arrays to Python and NaN/inf to ``None``."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return none_if_nan(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_report(report: dict, out_dir, title: str, history: Sequence[dict] | None = None) -> dict:
    """Write ``report.json``, ``report.md``, ``roc.png`` (and ``validation_curves.png`` if ``history``).

    Returns ``{"json": Path, "markdown": Path, "roc": Path[, "validation_curves": Path]}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "roc": out / "roc.png"}
    paths["json"].write_text(json.dumps(to_jsonable({"title": title, **report}), indent=1, allow_nan=False))
    paths["markdown"].write_text(markdown_report(report, title))
    plot_roc(report, paths["roc"], title=f"{title}: ROC curves")
    if history:
        paths["validation_curves"] = plot_validation_curves(history, out / "validation_curves.png",
                                                            title=f"{title}: validation metrics")
    return paths


def style_grid(transfer, examples: dict, path) -> Path:
    """Figure 4 of MSVCL v2 for a :class:`mammodg.records.styles.StyleTransfer`: row i = the example of
    style i and its transfer to every other style (diagonal: the original); last row = eq. (2) blending of
    the first style's example (style A) with its transfer to the second style (B), alpha = 0.0, 0.1, ..., 1.0.
    ``examples``: style -> (image (h, w, 1) in [0, 1], breast mask (h, w, 1))."""
    styles = transfer.styles
    m = len(styles)
    cols = max(m, len(BLEND_ALPHAS))
    fig = Figure(figsize=(1.6 * cols, 2.3 * (m + 1)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(m + 1, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")

    def show(ax, img, title):
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(title, fontsize=7)

    for i, src in enumerate(styles):
        img, mask = examples[src]
        for j, dst in enumerate(styles):
            out = transfer.transfer(img[None], mask[None], src, dst)[0]
            show(axes[i, j], out, f"original\n{src}" if i == j else f"{src}\n-> {dst}")
    img, mask = examples[styles[0]]
    style_b = transfer.transfer(img[None], mask[None], styles[0], styles[1])[0]
    for k, alpha in enumerate(BLEND_ALPHAS):
        show(axes[m, k], img * (1.0 - alpha) + style_b * alpha, f"blend alpha={alpha:.1f}")
    path = Path(path)
    fig.savefig(path)
    return path
