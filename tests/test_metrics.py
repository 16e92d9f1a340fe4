"""Throughput accounting (samba_jax/metrics.py)."""

import time

import jax
import jax.numpy as jnp
import numpy as np

from samba_jax import metrics


def _slow_step(x):  # ~0.5 s of matmuls on a 2-core CPU
    return jax.lax.fori_loop(0, 40, lambda _, a: jnp.tanh(a @ a), x)


def test_a_pause_counts_the_queued_train_step_as_training():
    """JAX dispatches asynchronously: an eval that waits for the last train step must not hide it."""
    step = jax.jit(_slow_step)
    x = jnp.full((1024, 1024), 0.01)
    jax.block_until_ready(step(x))  # compiled
    start = time.perf_counter()
    jax.block_until_ready(step(x))
    took = time.perf_counter() - start
    times = {}
    for pending in (True, False):
        tp = metrics.Throughput(tokens_per_step=10, train_flops_per_token=1.0, total_steps=1)
        out = step(x)
        tp.tick()
        with tp.pause(out if pending else None):
            np.asarray(out)  # the eval, which needs the step's result
        times[pending] = tp.report(1)["step_time"]
    assert times[True] >= 0.8 * took, (times, took)
    assert times[False] < 0.5 * took, (times, took)  # what the log showed before: the step's time lost in the pause
