"""Optimizer factories for the shared trainer (each takes Keras' EMA keywords ``use_ema``, ``ema_momentum``)."""
from __future__ import annotations

CONTRASTIVE_OPTIMIZERS = ("sgd", "adamw")


def contrastive_optimizer(name: str, *, learning_rate: float, batch_size: int, steps: int, warmup_steps: int = 0,
                          weight_decay: float = 0.0):
    """A factory of the contrastive stage's optimizer, with a cosine schedule to 0 at ``steps`` (after an
    optional linear warm-up of ``warmup_steps``).

    - ``sgd``: SGD (momentum 0.9) at SimCLR's linearly scaled peak ``learning_rate * batch_size / 256``
      (the paper's 0.3 at batch 256; LARS is not in Keras);
    - ``adamw``: AdamW at the peak ``learning_rate``, for short runs, where SGD without LARS' per-layer
      scaling barely moves a ResNet-50."""
    import keras

    if name not in CONTRASTIVE_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {CONTRASTIVE_OPTIMIZERS}, got {name!r}")

    def make(**ema):
        peak = learning_rate * batch_size / 256 if name == "sgd" else learning_rate
        decay = max(1, steps - warmup_steps)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup_steps else peak, decay, warmup_target=peak if warmup_steps else None,
            warmup_steps=warmup_steps)
        if name == "adamw":
            return keras.optimizers.AdamW(schedule, weight_decay=weight_decay, **ema)
        return keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=weight_decay or None, **ema)

    return make
