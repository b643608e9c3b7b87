"""Sampling strategies: Algorithm 1's pattern (numpy only) and the tf.data streams (``streams``, which
imports tensorflow when used, not here)."""
from mammodg.sampling.pattern import sampling_pattern

__all__ = ["sampling_pattern"]
