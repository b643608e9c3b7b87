"""Style transfer with the generators of a cyclegan run (MSVCL v2 section III-B1): used by the pair
builder to render every breast in each seen style, and by the cyclegan stage's style grid."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

STYLES_JSON = "styles.json"  # written by the cyclegan stage: styles, pairs, generator files


class StyleTransfer:
    """The generators of a cyclegan run: render images of one seen style in another (section III-B1).

    ``StyleTransfer.load(run_dir)``; ``styles`` lists the seen styles; ``transfer(images01, masks, src, dst)``
    maps ``(b, h, w, 1)`` images in [0, 1] (0 outside the breast ``masks``) of style ``src`` to ``dst``.
    """

    def __init__(self, styles: list[str], generators: dict, batch_size: int = 8, run_dir: str = ""):
        import tensorflow as tf

        self.styles = list(styles)
        self.run_dir = str(run_dir)  # the cyclegan run the generators come from (when loaded)
        self.generators = generators  # (src, dst) -> keras.Model
        self.batch_size = int(batch_size)
        spec = [tf.TensorSpec([None, None, None, 1], tf.float32)]  # one trace per generator, any size
        self._apply = {k: tf.function(functools.partial(m, training=False), input_signature=spec)
                       for k, m in generators.items()}

    @classmethod
    def load(cls, run_dir, batch_size: int = 8) -> "StyleTransfer":
        import keras

        import mammodg.models  # noqa: F401  (registers ReflectionPadding2D)

        path = Path(run_dir) / STYLES_JSON
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train the cyclegan stage first (mammodg train --stage cyclegan)")
        info = json.loads(path.read_text())
        gens = {(g["src"], g["dst"]): keras.models.load_model(Path(run_dir) / g["keras"]) for g in info["generators"]}
        return cls(info["styles"], gens, batch_size, run_dir)

    def transfer(self, images01: np.ndarray, masks: np.ndarray, src: str, dst: str) -> np.ndarray:
        """``(b, h, w, 1)`` float32 in [0, 1] of style ``src`` -> the same images in style ``dst``, in [0, 1],
        0 outside ``masks``. Sides are reflect-padded to a multiple of 4 for the generator and cropped back."""
        for s in (src, dst):
            if s not in self.styles:
                raise ValueError(f"unknown style {s!r}; this StyleTransfer has {self.styles}")
        images01 = np.asarray(images01, np.float32)
        if src == dst:
            return images01
        if images01.ndim != 4 or np.shape(masks) != images01.shape:
            raise ValueError(f"images01 must be (b, h, w, 1) and masks the same shape; "
                             f"got {images01.shape}, {np.shape(masks)}")
        h, w = images01.shape[1:3]
        x = np.where(masks, images01 * 2.0 - 1.0, -1.0).astype(np.float32)
        x = np.pad(x, [(0, 0), (0, -h % 4), (0, -w % 4), (0, 0)], mode="reflect")
        apply = self._apply[(src, dst)]
        y = np.concatenate([apply(x[i:i + self.batch_size]).numpy() for i in range(0, len(x), self.batch_size)])
        return np.where(masks, np.clip((y[:, :h, :w] + 1.0) / 2.0, 0.0, 1.0), 0.0).astype(np.float32)
