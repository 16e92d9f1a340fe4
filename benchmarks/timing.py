"""The one timing rule every benchmark uses: run once (compile, warm up), then the median of `iters` runs."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, *args, iters: int = 10) -> float:
    """Median wall time of fn(*args) in milliseconds, each run waited on with block_until_ready."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3
