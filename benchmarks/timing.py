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


def interleaved_median_ms(fns: dict, *args, rounds: int = 10, calls: int = 5) -> dict:
    """{name: median ms per call} of several functions timed in turn, round after round.

    For A/B comparisons of variants in one process: each round runs every function `calls` times back
    to back (dispatched asynchronously, waited on once), so clock and thermal drift over the run reach
    all of them alike instead of whichever was timed last. Every function is run once first.
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / calls)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}
