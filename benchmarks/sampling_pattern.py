#!/usr/bin/env python
"""Sampling pattern build time: 10 million slots over 1,000 segments (fast version), and the
slot-by-slot reference on 100,000 slots for comparison. Prints and saves benchmarks/results/sampling_pattern.json."""
import json
import time
from pathlib import Path

import numpy as np

from mammodg.sampling.pattern import sampling_pattern, sampling_pattern_reference


def timed(fn, n, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 20000, 1000)
    n = (n / n.sum() * 10_000_000).astype(np.int64) + 1
    small = np.maximum(1, (n / n.sum() * 100_000).astype(np.int64))
    res = {
        "fast_10M_slots_1000_segments_s": round(timed(sampling_pattern, n, 3), 3),
        "slots": int(n.sum()),
        "fast_100k_slots_s": round(timed(sampling_pattern, small, 3), 4),
        "reference_100k_slots_s": round(timed(sampling_pattern_reference, small, 1), 2),
        "small_slots": int(small.sum()),
    }
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/sampling_pattern.json").write_text(json.dumps(res, indent=1))
    for k, v in res.items():
        print(f"{k:>32}: {v}")


if __name__ == "__main__":
    main()
