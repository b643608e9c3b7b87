"""Losses shared by the stages (``keras.ops``: any Keras backend).

``nt_xent`` is eq. (1) of MSVCL v2 (SimCLR's NT-Xent): for a batch of N positive pairs
``(z1[i], z2[i])`` there are 2N anchors; anchor ``i`` has its partner as positive and the other
2N - 2 samples as negatives, similarity is the cosine (dot product of L2-normalised projections)
divided by the temperature, and the loss is the mean over all 2N anchors of

    -log( exp(sim(z_i, z_pos) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ).

Across replicas (``tf.distribute``), every replica gathers the projections of all replicas, so each
local anchor sees the negatives of the *global* batch; each replica returns the mean over its own
anchors and Keras divides by the replica count before summing gradients, which reproduces the
single-device loss on the global batch exactly.
"""
from __future__ import annotations

import keras
from keras import ops

_NEG = -1e9  # masks self-similarity out of the softmax


def _l2_normalize(z):
    return z / ops.sqrt(ops.maximum(ops.sum(ops.square(z), axis=-1, keepdims=True), 1e-24))


def _gather_replicas(z):
    """(global batch, index offset of this replica's rows) under tf.distribute; (z, 0) otherwise."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return z, 0
    n = tf.shape(z)[0]
    return ctx.all_gather(z, axis=0), ctx.replica_id_in_sync_group * n


def nt_xent_per_anchor(z1, z2, temperature: float = 0.1, cross_replica: bool = False):
    """NT-Xent of each anchor: shape (2n,), rows ``[z1 anchors, z2 anchors]`` (see the module docstring)."""
    z1 = _l2_normalize(ops.cast(z1, "float32"))
    z2 = _l2_normalize(ops.cast(z2, "float32"))
    n = ops.shape(z1)[0]
    if cross_replica:
        all1, offset = _gather_replicas(z1)
        all2, _ = _gather_replicas(z2)
    else:
        all1, all2, offset = z1, z2, 0
    big_n = ops.shape(all1)[0]
    anchors = ops.concatenate([z1, z2], axis=0)  # (2n, d)
    candidates = ops.concatenate([all1, all2], axis=0)  # (2N, d)
    logits = ops.matmul(anchors, ops.transpose(candidates)) / temperature  # (2n, 2N)
    local = ops.arange(n) + offset
    self_idx = ops.concatenate([local, local + big_n], axis=0)
    pos_idx = ops.concatenate([local + big_n, local], axis=0)
    cols = ops.arange(2 * big_n)
    logits = ops.where(ops.equal(cols[None, :], self_idx[:, None]), _NEG, logits)
    return keras.losses.sparse_categorical_crossentropy(pos_idx, logits, from_logits=True)


def nt_xent(z1, z2, temperature: float = 0.1, cross_replica: bool = False):
    """Eq. (1) averaged over the 2N anchors; row i of ``z1`` and row i of ``z2`` are a positive pair."""
    return ops.mean(nt_xent_per_anchor(z1, z2, temperature, cross_replica))


@keras.saving.register_keras_serializable("mammodg")
class NTXent(keras.losses.Loss):
    """NT-Xent as a Keras loss on ``y_pred`` of shape (b, k, d) (the projections of k views per sample);
    ``y_true`` is ignored. ``pairs`` lists the positive pairs of views, ``((0, 1),)`` by default; with
    several (MSVCL: ``((0, 1), (0, 2))``, the multi-style and the multi-view pair) the loss is the mean of
    their NT-Xent losses. Returns one value per sample (the mean over its anchors and pairs), so Keras'
    mean over the batch is the mean over the 2N anchors of each pair, and its division by the replica
    count makes the cross-replica sum equal the global-batch loss.
    """

    def __init__(self, temperature: float = 0.1, cross_replica: bool = True, pairs=((0, 1),), name: str = "nt_xent",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = temperature
        self.cross_replica = cross_replica
        self.pairs = tuple(tuple(int(v) for v in p) for p in pairs)

    def call(self, y_true, y_pred):
        n = ops.shape(y_pred)[0]
        cross = self.cross_replica and keras.backend.backend() == "tensorflow"
        total = 0.0
        for i, j in self.pairs:
            per_anchor = nt_xent_per_anchor(y_pred[:, i], y_pred[:, j], self.temperature, cross)
            total = total + (per_anchor[:n] + per_anchor[n:]) / 2
        return total / len(self.pairs)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature, "cross_replica": self.cross_replica,
                "pairs": [list(p) for p in self.pairs]}


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
