"""Detection reports (MSVCL v2 section IV): the Table II markdown, FROC curves, the paper's Figure 8
overlays, and the report files of one model (``detection_report.json`` / ``.md``, ``froc.png``).

The numbers come from :mod:`mammodg.metrics.detection`; this module only lays them out.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mammodg.metrics.detection import FROC_FPS_PER_IMAGE, as_boxes, average_precision, by_domain, domain_table, froc

__all__ = ["domain_table_markdown", "plot_froc", "plot_overlays", "detection_report", "write_detection_report"]


def domain_table_markdown(rows: Sequence[dict], *, label: str = "AP@0.5 (%)", scale: float = 100.0,
                          digits: int = 1) -> str:
    """Markdown table of :func:`~mammodg.metrics.detection.domain_table` rows, columns as in Table II: method, the seen domains and
    their average, the unseen domains and their average (values x ``scale``; ``n/a`` where undefined)."""
    from mammodg.report import _md_cell

    if not rows:
        return ""
    seen, unseen = list(rows[0]["seen"]), list(rows[0]["unseen"])
    fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v * scale:.{digits}f}"  # noqa: E731
    head = (["Method"] + [f"Seen: {_md_cell(d)}" for d in seen] + ["Seen avg."]
            + ([f"Unseen: {_md_cell(d)}" for d in unseen] + ["Unseen avg."] if unseen else []))
    lines = [f"{label}, per domain", "", "| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [_md_cell(r["method"])] + [fmt(r["seen"][d]) for d in seen] + [fmt(r["seen_avg"])]
        if unseen:
            cells += [fmt(r["unseen"][d]) for d in unseen] + [fmt(r["unseen_avg"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



def plot_froc(curves: Mapping[str, dict], path, title: str | None = None) -> Path:
    """FROC curves (name -> :func:`~mammodg.metrics.detection.froc` result) on a log FP axis, with the sensitivities at the read-out
    rates marked and given in the legend. Returns the written path."""
    from mammodg.report import _colours, _new_figure

    path = Path(path)
    fig = _new_figure((6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    rates = sorted({f for c in curves.values() for f in c["fps_per_image"]}) or list(FROC_FPS_PER_IMAGE)
    lo = min(rates) / 4
    for (name, c), colour in zip(curves.items(), _colours(len(curves))):
        x = np.maximum(np.asarray(c["curve"]["fps_per_image"], float), lo)
        y = np.asarray(c["curve"]["sensitivity"], float)
        reads = ", ".join(f"{s:.2f}@{f:g}" for f, s in zip(c["fps_per_image"], c["sensitivity"]))
        ax.step(x, y, where="post", color=colour, lw=1.6, label=f"{name} (n={c['n_images']}, "
                f"lesions={c['n_lesions']}): {reads}")
        ax.plot(c["fps_per_image"], c["sensitivity"], "o", color=colour, ms=5)
        if x[-1] < max(rates):  # beyond its last threshold the curve cannot go: its plateau, dotted
            ax.plot([x[-1], max(rates)], [y[-1], y[-1]], ls=":", color=colour, lw=1.2)
    ax.set_xscale("log")
    ax.set_xlim(lo, max(max(rates) * 2, max((c["max_fps_per_image"] for c in curves.values()), default=0)))
    ax.set_ylim(0, 1.02)
    ax.set_xticks(rates, [f"{f:g}" for f in rates])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("mean false positives per image")
    ax.set_ylabel("lesion sensitivity")
    ax.grid(True, which="major", lw=0.4, color="0.85")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "FROC (hit: IoU >= 0.5)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_overlays(panels: Sequence[Mapping], path, *, ncols: int | None = None, score_threshold: float = 0.0,
                  panel_size: float = 3.0) -> Path:
    """Figure 8 style: each panel an image with its ground truth (green) and its detections with score
    >= ``score_threshold`` (red, score written above). A panel is a mapping with ``image`` ((h, w) or
    (h, w, 1), any dtype), ``gt_boxes``, ``boxes``, ``scores`` and an optional ``title``."""
    from matplotlib.patches import Rectangle

    from mammodg.report import _new_figure

    path = Path(path)
    if not panels:
        raise ValueError("plot_overlays needs at least one panel")
    ncols = ncols or min(len(panels), 4)
    nrows = -(-len(panels) // ncols)
    fig = _new_figure((panel_size * ncols, panel_size * 1.3 * nrows))
    for k, p in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        where = f"panel {k}" + (f" ({p['title']!r})" if p.get("title") else "")
        img = np.asarray(p["image"])
        img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
        if img.ndim != 2:
            raise ValueError(f"{where}: image has shape {np.asarray(p['image']).shape}, expected (h, w) or (h, w, 1)")
        ax.imshow(img, cmap="gray", interpolation="nearest")
        for b in as_boxes(p.get("gt_boxes"), f"{where} gt_boxes"):
            ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="lime", lw=1.4))
        dets = as_boxes(p.get("boxes"), f"{where} boxes")
        scores = np.asarray(p.get("scores") if p.get("scores") is not None else [], float).reshape(-1)
        if len(scores) != len(dets):
            raise ValueError(f"{where}: {len(scores)} scores for {len(dets)} boxes")
        for b, s in zip(dets, scores):
            if s >= score_threshold:
                ax.add_patch(Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, ec="red", lw=1.2))
                ax.text(b[0], b[1] - 2, f"{s:.2f}", color="red", fontsize=6, va="bottom")
        ax.set_xlim(0, img.shape[1])
        ax.set_ylim(img.shape[0], 0)
        ax.set_axis_off()
        if p.get("title"):
            ax.set_title(str(p["title"]), fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------------------ report
def detection_report(images: Sequence[Mapping], *, seen: Sequence[str] = (), unseen: Sequence[str] = (),
                     method: str = "model") -> dict:
    """Everything issue 18 asks of an evaluation, for one model: AP@0.5 and COCO mAP over all images,
    FROC over all images and per domain, and the Table II rows (AP@0.5 and mAP) with ``seen`` (default:
    every domain present) and ``unseen`` averages."""
    by_dom = by_domain(images)
    seen = list(seen) if seen or unseen else sorted(by_dom)
    return {
        "global": average_precision(images),
        "froc": {"all": froc(images), **{d: froc(ims) for d, ims in sorted(by_dom.items())}},
        "table_ap50": domain_table({method: images}, seen, unseen, metric="ap50"),
        "table_map": domain_table({method: images}, seen, unseen, metric="map"),
    }


def _report_markdown(report: dict, title: str) -> str:
    from mammodg.report import _fmt, _md_cell

    g = report["global"]
    rates = report["froc"]["all"]["fps_per_image"]
    lines = [f"# {title}", "",
             f"{g['n_images']} images, {g['n_lesions']} lesions, {g['n_detections']} detections. "
             f"AP@0.5 {_fmt(g['ap50'])}, COCO mAP@[.50:.95] {_fmt(g['map'])} (pycocotools, images without "
             "findings included).", "",
             "FROC, lesion sensitivity at mean false positives per image (hit: IoU >= 0.5 with an unmatched lesion):",
             "", "| Domain | Images | Lesions | " + " | ".join(f"@{f:g} FP/image" for f in rates) + " |",
             "|---|---:|---:|" + "---:|" * len(rates)]
    for name, fr in report["froc"].items():
        cells = [_md_cell(name), str(fr["n_images"]), str(fr["n_lesions"])] + [_fmt(v, 3) for v in fr["sensitivity"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", domain_table_markdown(report["table_ap50"], label="AP@0.5 (%)"),
              domain_table_markdown(report["table_map"], label="COCO mAP@[.50:.95] (%)")]
    return "\n".join(lines)


def write_detection_report(images: Sequence[Mapping], out_dir, *, title: str = "Detection", seen=(), unseen=(),
                           method: str = "model") -> dict:
    """Write ``detection_report.json``, ``detection_report.md`` and ``froc.png`` into ``out_dir``;
    returns the report and the paths (``{"report": ..., "json": Path, "markdown": Path, "froc": Path}``)."""
    import json

    from mammodg.report import to_jsonable

    report = detection_report(images, seen=seen, unseen=unseen, method=method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "detection_report.json", "markdown": out / "detection_report.md", "froc": out / "froc.png"}
    paths["json"].write_text(json.dumps(to_jsonable({"title": title, **report}), indent=1, allow_nan=False))
    paths["markdown"].write_text(_report_markdown(report, title))
    plot_froc(report["froc"], paths["froc"], title=f"{title}: FROC (hit: IoU >= 0.5)")
    return {"report": report, **paths}
