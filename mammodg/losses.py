"""Losses shared by the stages (``keras.ops``: any Keras backend).

``nt_xent`` is eq. (1) of MSVCL v2 (SimCLR's NT-Xent): for a batch of N positive pairs
``(z1[i], z2[i])`` there are 2N anchors; anchor ``i`` has its partner as positive and the other
2N - 2 samples as negatives, similarity is the cosine (dot product of L2-normalised projections)
divided by the temperature, and the loss is the mean over all 2N anchors of

    -log( exp(sim(z_i, z_pos) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ).

With ``groups`` (an integer id per pair, e.g. the patient) the sum also leaves out every sample of the
anchor's group except its positive: the other breast or view of the same patient is not a negative. It is
masked like the self-similarity; the positive always stays, although it shares the anchor's group.

Across replicas (``tf.distribute``), every replica gathers the projections of all replicas, so each
local anchor sees the negatives of the *global* batch; each replica returns the mean over its own
anchors and Keras divides by the replica count before summing gradients, which reproduces the
single-device loss on the global batch exactly. The groups are gathered the same way.
"""
from __future__ import annotations

import keras
from keras import ops

_NEG = -1e9  # masks self-similarity (and same-group samples) out of the softmax


def _l2_normalize(z):
    return z / ops.sqrt(ops.maximum(ops.sum(ops.square(z), axis=-1, keepdims=True), 1e-24))


def gather_replicas(x):
    """(global batch, index offset of this replica's rows) under tf.distribute; (x, 0) otherwise."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return x, 0
    n = tf.shape(x)[0]
    return ctx.all_gather(x, axis=0), ctx.replica_id_in_sync_group * n


def _local(x):
    return x, 0


def nt_xent_per_anchor(z1, z2, temperature: float = 0.1, groups=None, *, cross_replica: bool = False):
    """NT-Xent of each anchor: shape (2n,), rows ``[z1 anchors, z2 anchors]``; ``groups``: None or (n,)
    integer ids (see the module docstring)."""
    z1 = _l2_normalize(ops.cast(z1, "float32"))
    z2 = _l2_normalize(ops.cast(z2, "float32"))
    n = ops.shape(z1)[0]
    gather = gather_replicas if cross_replica else _local
    all1, offset = gather(z1)
    all2, _ = gather(z2)
    big_n = ops.shape(all1)[0]
    anchors = ops.concatenate([z1, z2], axis=0)  # (2n, d)
    candidates = ops.concatenate([all1, all2], axis=0)  # (2N, d)
    logits = ops.matmul(anchors, ops.transpose(candidates)) / temperature  # (2n, 2N)
    local = ops.arange(n) + offset
    self_idx = ops.concatenate([local, local + big_n], axis=0)
    pos_idx = ops.concatenate([local + big_n, local], axis=0)
    cols = ops.arange(2 * big_n)
    masked = ops.equal(cols[None, :], self_idx[:, None])
    if groups is not None:
        groups = ops.reshape(ops.convert_to_tensor(groups), (-1,))
        if groups.shape[0] is not None and z1.shape[0] is not None and groups.shape[0] != z1.shape[0]:
            raise ValueError(f"nt_xent: groups has {groups.shape[0]} ids for {z1.shape[0]} pairs; give one per pair")
        all_groups, _ = gather(groups)
        same = ops.equal(ops.concatenate([groups, groups])[:, None], ops.concatenate([all_groups, all_groups])[None, :])
        not_pos = ops.logical_not(ops.equal(cols[None, :], pos_idx[:, None]))
        masked = ops.logical_or(masked, ops.logical_and(same, not_pos))
    logits = ops.where(masked, _NEG, logits)
    return keras.losses.sparse_categorical_crossentropy(pos_idx, logits, from_logits=True)


def nt_xent(z1, z2, temperature: float = 0.1, groups=None, *, cross_replica: bool = False):
    """Eq. (1) averaged over the 2N anchors; row i of ``z1`` and row i of ``z2`` are a positive pair.
    ``groups`` (n,) integer ids: samples of one group are not negatives of each other."""
    return ops.mean(nt_xent_per_anchor(z1, z2, temperature, groups, cross_replica=cross_replica))


@keras.saving.register_keras_serializable("mammodg")
class NTXent(keras.losses.Loss):
    """NT-Xent as a Keras loss on ``y_pred`` of shape (b, k, d) (the projections of k views per sample).
    ``pairs`` lists the positive pairs of views, ``((0, 1),)`` by default; with several (MSVCL:
    ``((0, 1), (0, 2))``, the multi-style and the multi-view pair) the loss is the mean of their NT-Xent
    losses. Returns one value per sample (the mean over its anchors and pairs), so Keras' mean over the
    batch is the mean over the 2N anchors of each pair, and its division by the replica count makes the
    cross-replica sum equal the global-batch loss.

    ``y_true`` is ignored unless ``groups=True``; then it is the group id of each sample, shape (b,) or
    (b, 1), and samples of one group are not negatives of each other in any pair. Keras casts ``y_true`` to
    float32 before the loss sees it, so ids must be integers below 2**24 to stay distinct
    (:func:`mammodg.records.pairs.patient_group_id` gives such ids).
    """

    def __init__(self, temperature: float = 0.1, cross_replica: bool = True, pairs=((0, 1),), groups: bool = False,
                 name: str = "nt_xent", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = temperature
        self.cross_replica = cross_replica
        self.pairs = tuple(tuple(int(v) for v in p) for p in pairs)
        self.groups = bool(groups)

    def call(self, y_true, y_pred):
        n = ops.shape(y_pred)[0]
        cross = self.cross_replica and keras.backend.backend() == "tensorflow"
        groups = ops.reshape(y_true, (-1,)) if self.groups else None
        total = 0.0
        for i, j in self.pairs:
            per_anchor = nt_xent_per_anchor(y_pred[:, i], y_pred[:, j], self.temperature, groups, cross_replica=cross)
            total = total + (per_anchor[:n] + per_anchor[n:]) / 2
        return total / len(self.pairs)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "cross_replica": self.cross_replica,
                "pairs": [list(p) for p in self.pairs], "groups": self.groups}


# --- FCOS (Tian et al. 2019; MSVCL v2 section III-C) ---------------------------------------------------------------
# All three terms are sums over this replica's locations divided by normalisers summed over replicas, so the
# replicas' losses add up to the global-batch loss: what Keras expects, since it sums gradients over replicas.
# The cross-replica sum is a function the stage passes in (tf.distribute's all_reduce); the default, identity, is
# exact on one device.


def _bce_with_logits(y, x):
    """Element-wise binary cross-entropy of targets ``y`` in [0, 1] and logits ``x``, stable for large |x|."""
    return ops.maximum(x, 0.0) - x * y + ops.log1p(ops.exp(-ops.abs(x)))


def sigmoid_focal_loss(labels, logits, alpha: float = 0.25, gamma: float = 2.0):
    """Element-wise sigmoid focal loss (RetinaNet) of 0/1 ``labels`` and ``logits``, in float32."""
    y, x = ops.cast(labels, "float32"), ops.cast(logits, "float32")
    p = ops.sigmoid(x)
    p_t = p * y + (1 - p) * (1 - y)
    return (alpha * y + (1 - alpha) * (1 - y)) * ops.power(1 - p_t, gamma) * _bce_with_logits(y, x)


def giou(boxes1, boxes2, eps: float = 1e-7):
    """Element-wise generalized IoU of (..., 4) boxes x0, y0, x1, y1; finite for empty and degenerate boxes."""
    a, b = ops.cast(boxes1, "float32"), ops.cast(boxes2, "float32")

    def area(x):
        return ops.maximum(x[..., 2] - x[..., 0], 0.0) * ops.maximum(x[..., 3] - x[..., 1], 0.0)

    lo, hi = ops.maximum(a[..., :2], b[..., :2]), ops.minimum(a[..., 2:], b[..., 2:])
    inter = ops.prod(ops.maximum(hi - lo, 0.0), axis=-1)
    union = area(a) + area(b) - inter
    enclose = ops.prod(ops.maximum(a[..., 2:], b[..., 2:]) - ops.minimum(a[..., :2], b[..., :2]), axis=-1)
    enclose = ops.maximum(enclose, 0.0)
    return inter / ops.maximum(union, eps) - (enclose - union) / ops.maximum(enclose, eps)


def _ltrb_boxes(ltrb):
    """Distances (l, t, r, b) from a location -> a box around that location taken as the origin."""
    return ops.concatenate([-ltrb[..., :2], ltrb[..., 2:]], axis=-1)


def fcos_loss_terms(targets, outputs, num_classes: int, alpha: float = 0.25, gamma: float = 2.0,
                    replica_sum=None):
    """FCOS losses from :func:`~mammodg.models.fcos_targets.fcos_targets` and the model outputs, in float32.

    * ``classification``: sigmoid focal loss over all locations and classes / max(1, positives);
    * ``box``: (1 - GIoU) on positives weighted by the centerness target / the sum of those weights;
    * ``centerness``: BCE of the centerness logit on positives / max(1, positives);
    * ``total``: their sum.

    Positives and weights are summed over replicas by ``replica_sum`` (identity when None). A batch without
    positives gives 0 for ``box`` and ``centerness`` (no 0/0): images without lesions train classification only.
    """
    labels = ops.cast(targets["labels"], "int32")
    positive = ops.cast(labels >= 0, "float32")
    weight = ops.cast(targets["centerness"], "float32") * positive
    onehot = ops.one_hot(ops.maximum(labels, 0), num_classes, dtype="float32") * positive[..., None]
    local = ops.stack([ops.sum(positive), ops.sum(weight)])
    num_pos, weight_sum = ops.unstack(replica_sum(local) if replica_sum is not None else local)
    norm = ops.maximum(num_pos, 1.0)
    cls = ops.sum(sigmoid_focal_loss(onehot, outputs["classification"], alpha, gamma)) / norm
    pred = _ltrb_boxes(ops.cast(outputs["regression"], "float32"))
    target = _ltrb_boxes(ops.cast(targets["ltrb"], "float32"))
    box = ops.sum((1.0 - giou(pred, target)) * weight) / ops.maximum(weight_sum, 1e-6)
    ctr_bce = _bce_with_logits(ops.cast(targets["centerness"], "float32"), ops.cast(outputs["centerness"], "float32"))
    ctr = ops.sum(ctr_bce * positive) / norm
    return {"classification": cls, "box": box, "centerness": ctr, "total": cls + box + ctr}


@keras.saving.register_keras_serializable("mammodg")
class FCOSLoss:
    """FCOS loss for one input geometry: ``loss(y_true, y_pred)`` -> dict of the three terms and ``total``.

    ``y_true``: ``{"boxes": (B, M, 4) x0, y0, x1, y1 in input pixels, "classes": (B, M) ints, -1 = padding}``;
    ``y_pred``: the detector's output dict. Targets follow :func:`~mammodg.models.fcos_targets.fcos_targets`
    with the regression ranges of ``levels`` unless ``ranges`` is given. In a ``compute_loss`` override
    return ``loss(y, y_pred)["total"]``; under ``tf.distribute`` pass ``replica_sum`` (e.g.
    ``lambda x: tf.distribute.get_replica_context().all_reduce("SUM", x)``) so positives are counted globally.
    """

    def __init__(self, image_shape, num_classes: int = 1, levels=(3, 4, 5, 6, 7), ranges=None,
                 center_radius: float = 1.5, alpha: float = 0.25, gamma: float = 2.0, replica_sum=None):
        from mammodg.models import fcos_targets as ft

        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.num_classes, self.levels = int(num_classes), ft.check_levels(levels)
        self.ranges = [tuple(float(v) for v in r) for r in (ranges or ft.regression_ranges(self.levels))]
        self.center_radius, self.alpha, self.gamma = float(center_radius), float(alpha), float(gamma)
        self.replica_sum = replica_sum
        self._shapes, self._strides = ft.level_shapes(self.image_shape, self.levels), ft.strides_of(self.levels)

    def targets(self, y_true):
        from mammodg.models.fcos_targets import fcos_targets

        return fcos_targets(y_true["boxes"], y_true["classes"], self._shapes, self._strides, self.ranges,
                            self.center_radius)

    def __call__(self, y_true, y_pred):
        return fcos_loss_terms(self.targets(y_true), y_pred, self.num_classes, self.alpha, self.gamma,
                               self.replica_sum)

    def get_config(self):
        return {"image_shape": list(self.image_shape), "num_classes": self.num_classes, "levels": list(self.levels),
                "ranges": [list(r) for r in self.ranges], "center_radius": self.center_radius, "alpha": self.alpha,
                "gamma": self.gamma}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

def max_margin_contrastive(f1, f2, y, margin: float = 10.0):
    """Eq. (3) of MSVCL v2, the matching loss: ``1/(2K) sum_k Y D^2 + (1 - Y) max(m - D, 0)^2``.

    ``f1``, ``f2``: (K, d) embeddings of the CC and MLO ROI of K pairs; ``y``: (K,) 1 for a matched
    pair (the same lesion), 0 otherwise; ``D = ||f1 - f2||_2``. The positive term uses the squared
    distance directly (no square root, so its gradient is defined at D = 0).
    """
    diff = ops.cast(f1, "float32") - ops.cast(f2, "float32")
    sq = ops.sum(ops.square(diff), axis=-1)
    d = ops.sqrt(ops.maximum(sq, 1e-12))
    y = ops.cast(ops.reshape(y, ops.shape(sq)), "float32")
    per_pair = y * sq + (1.0 - y) * ops.square(ops.maximum(margin - d, 0.0))
    k = ops.maximum(ops.cast(ops.shape(sq)[0], "float32"), 1.0)  # K = 0 (no pair) gives 0, not NaN
    return ops.sum(per_pair) / (2.0 * k)


# ---------------------------------------------------------------------------------------------- CycleGAN
# Zhu et al. 2017 (and MSVCL v2 section IV-B): least-squares adversarial loss, L1 cycle and identity losses.
def lsgan_generator_loss(fake_scores):
    """The generator's least-squares loss: mean of ``(D(G(x)) - 1)^2`` (fakes should score as real)."""
    return ops.mean(ops.square(ops.cast(fake_scores, "float32") - 1.0))


def lsgan_discriminator_loss(real_scores, fake_scores):
    """The discriminator's least-squares loss: ``(mean (D(real) - 1)^2 + mean D(fake)^2) / 2``."""
    real = ops.mean(ops.square(ops.cast(real_scores, "float32") - 1.0))
    return 0.5 * (real + ops.mean(ops.square(ops.cast(fake_scores, "float32"))))


def l1_loss(x, y):
    """Mean absolute difference: the cycle loss ``|F(G(a)) - a|`` and the identity loss ``|G(b) - b|``."""
    return ops.mean(ops.abs(ops.cast(x, "float32") - ops.cast(y, "float32")))
