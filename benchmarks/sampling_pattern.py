#!/usr/bin/env python
"""Sampling pattern build time: 10 million slots over 1,000 segments (fast version) against the limit,
writing the 40 MB int32 pattern once, and the slot-by-slot reference on 100,000 slots for comparison.
Medians of several runs (wall and CPU time). Prints and saves benchmarks/results/sampling_pattern.json."""
import json
import os
import time
from pathlib import Path

import numpy as np

from mammodg.sampling.pattern import sampling_pattern, sampling_pattern_reference


def timed(fn, repeats):
    """Median wall and CPU seconds of ``fn()`` over ``repeats`` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu))


def main():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 20000, 1000)
    n = (n / n.sum() * 10_000_000).astype(np.int64) + 1
    small = np.maximum(1, (n / n.sum() * 100_000).astype(np.int64))
    total = int(n.sum())
    fast_wall, fast_cpu = timed(lambda: sampling_pattern(n), 7)
    write_wall, write_cpu = timed(lambda: np.full(total, -1, np.int32), 7)  # the pattern's 40 MB, written once
    res = {
        "slots": total,
        "segments": len(n),
        "fast_10M_slots_1000_segments_s": round(fast_wall, 3),
        "fast_10M_cpu_s": round(fast_cpu, 3),
        "write_40MB_s": round(write_wall, 4),
        "fast_over_write": round(fast_wall / write_wall, 1),
        "fast_100k_slots_s": round(timed(lambda: sampling_pattern(small), 7)[0], 4),
        "reference_100k_slots_s": round(timed(lambda: sampling_pattern_reference(small), 1)[0], 2),
        "small_slots": int(small.sum()),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/sampling_pattern.json").write_text(json.dumps(res, indent=1))
    for k, v in res.items():
        print(f"{k:>32}: {v}")


if __name__ == "__main__":
    main()
