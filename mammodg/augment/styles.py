"""Which views and styles of a breast one contrastive sample shows (MSVCL v2 sections III-A/B, eq. 2).

The methods and why multi-style positives are always two different styles: README, "Contrastive
pre-training".
"""
from __future__ import annotations

from mammodg.augment.crops import randint, uniform

METHODS = ("simclr", "mscl", "mvcl", "msvcl")


def multi_style(method: str) -> bool:
    """Whether ``method``'s positives differ in style (it needs the pair records' style transfers)."""
    return method in ("mscl", "msvcl")


def uses_styles(method: str) -> bool:
    """Whether ``method`` draws styles from the pair records' style transfers: the multi-style methods and
    MVCL v2 (its CC and MLO are style-diversified, section III-B2)."""
    return method in ("mscl", "mvcl", "msvcl")


def views_per_sample(method: str) -> int:
    """How many views of a breast one sample holds: 4 for MSVCL (a multi-style pair of small crops of the
    CC and a multi-view pair of large crops of the CC and MLO), 2 otherwise."""
    return 4 if method == "msvcl" else 2


def positive_pairs(method: str) -> tuple[tuple[int, int], ...]:
    """The positive pairs among a sample's views (indices into view1, view2, ...)."""
    return ((0, 1), (2, 3)) if method == "msvcl" else ((0, 1),)


PAIR_TYPES = ("multi_style", "multi_view", "same_image")


def pair_types(method: str) -> tuple[str, ...]:
    """The kind of each of :func:`positive_pairs` (one of ``PAIR_TYPES``): validation reports each apart."""
    return {"simclr": ("same_image",), "mscl": ("multi_style",), "mvcl": ("multi_view",),
            "msvcl": ("multi_style", "multi_view")}[method]


def view_sides(method: str) -> tuple[int, ...]:
    """The sides (1-based) of a sample's multi-view pair: they use ``contrastive.view_crop_scale`` (large
    crops at the encoder's resolution, which share tissue across CC and MLO)."""
    return tuple(s + 1 for (i, j), t in zip(positive_pairs(method), pair_types(method)) if t == "multi_view"
                 for s in (i, j))


def diversified_style(seed, n_styles):
    """A style drawn by the style-diversification rule (MSVCL v2 section III-B, eq. 2): two styles ``a``,
    ``b`` chosen uniformly (possibly equal) and ``alpha`` uniform in {0, 0.1, .., 1.0}."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 3)
    return randint(s[0], n_styles), randint(s[1], n_styles), tf.cast(randint(s[2], 11), tf.float32) / 10.0


def choose(n_views, n_styles, method: str, seed):
    """What a sample is made of: per side i (``view1``, ``view2``[, ``view3``, ``view4``]) a view ``view{i}`` and the
    styles ``style{i}_a``, ``style{i}_b`` blended with ``alpha{i}`` (eq. 2).

    - ``simclr``: one random view of the breast twice, own style;
    - ``mscl``: one random view in two different styles;
    - ``mvcl`` (MVCL v2): the CC and the MLO, each in its own :func:`diversified_style`;
    - ``msvcl`` (MSVCL v2): sides 1-2 the CC in two different styles (as ``mscl``), sides 3-4 the CC and
      the MLO (as ``mvcl``).

    Multi-style sides: one is a pure style ``s``, the other a blend ``a * (1 - alpha) + b * alpha`` with
    ``a != s`` and ``alpha`` in {0, 0.1, .., 0.5}, so ``s`` makes at most half of it; which side is pure is
    random. A breast with one view gives same-view pairs."""
    import tensorflow as tf

    k = views_per_sample(method)
    s = tf.random.experimental.stateless_split(seed, 13)
    mlo = tf.minimum(1, n_views - 1)  # CC with MLO of the same breast (same view twice if only one)
    if method == "mvcl":
        views = [tf.constant(0), mlo]
    elif method == "msvcl":
        views = [tf.constant(0), tf.constant(0), tf.constant(0), mlo]
    else:  # one random view of the breast, twice
        views = [randint(s[0], n_views)] * 2
    out = {f"view{i + 1}": v for i, v in enumerate(views)}
    if multi_style(method):
        pure = randint(s[1], n_styles)
        p_side = (pure, pure, tf.constant(0.0))

        def blend(s1, s2, s3):  # any blend with at most half of ``pure``
            other = (pure + 1 + randint(s1, n_styles - 1)) % n_styles  # != pure (when there are 2+ styles)
            return other, randint(s2, n_styles), tf.cast(randint(s3, 6), tf.float32) / 10.0

        blends = [blend(s[2], s[3], s[4]), blend(s[6], s[7], s[8])]
        anchor_pure = uniform(s[5]) < 0.5
        sides = [(anchor_pure, p_side, blends[0]), (anchor_pure, blends[1], p_side)]
        for i, (pick, if_pure, if_blend) in enumerate(sides, start=1):
            for j, key in enumerate(("a", "b")):
                out[f"style{i}_{key}"] = tf.where(pick, if_pure[j], if_blend[j])
            out[f"alpha{i}"] = tf.where(pick, if_pure[2], if_blend[2])
    own = (tf.constant(0), tf.constant(0), tf.constant(0.0))
    for i in range(3 if multi_style(method) else 1, k + 1):  # the other sides: diversified (MVCL v2) or own style
        a, b, alpha = diversified_style(s[8 + i], n_styles) if uses_styles(method) else own
        out.update({f"style{i}_a": a, f"style{i}_b": b, f"alpha{i}": alpha})
    return out


def styled(images, n_styles, view, a, b, alpha):
    """The stored image (h, w, 1) float32 of ``view`` as ``style_a * (1 - alpha) + style_b * alpha`` (eq. 2);
    ``images`` are a pair record's PNGs, view-major (``view * n_styles + style``)."""
    import tensorflow as tf

    def decode(i):
        return tf.cast(tf.io.decode_png(images[view * n_styles + i], channels=1, dtype=tf.uint16), tf.float32)

    return tf.cond(tf.equal(a, b) | tf.equal(alpha, 0.0), lambda: decode(a),
                   lambda: decode(a) * (1.0 - alpha) + decode(b) * alpha)
