"""`warp_scans`: the backward's reverse recurrence over a (4, 32) tile on one warp, by warp shuffles.

On a CPU it runs as `linear_recurrence(reverse=True)` (Pallas interpret mode); on a GPU
(`JAX_PLATFORMS=cuda python -m pytest tests/pallas_kernels/test_warp_scans.py`) the same kernel runs
the inline-PTX shuffles inside Triton's layout of a (4, 32) tile on one warp, the layout they assume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan import warp_scans

INTERPRET = jax.default_backend() == "cpu"


def test_applies_only_to_the_layout_it_assumes():
    assert warp_scans.applies(4, 32, 1)
    for block_d, chunk, warps in [(8, 32, 1), (4, 16, 1), (4, 64, 1), (4, 32, 2), (2, 32, 1)]:
        assert not warp_scans.applies(block_d, chunk, warps)


def _kernel_reverse(a, b):
    def kernel(a_ref, b_ref, h_ref):
        h_ref[...] = warp_scans.reverse_recurrence(pltriton.load(a_ref), pltriton.load(b_ref), interpret=INTERPRET)

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(b.shape, jnp.float32),
                          compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
                          interpret=INTERPRET)(a, b)


def _numpy_reverse(a, b):
    h = np.zeros_like(b, dtype=np.float64)
    later = np.zeros(b.shape[0])
    for t in reversed(range(b.shape[1])):
        later = a[:, t] * later + b[:, t]
        h[:, t] = later
    return h


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reverse_recurrence_against_a_loop(seed):
    ka, kb = jax.random.split(jax.random.key(seed))
    a = jax.random.uniform(ka, (4, 32), jnp.float32, 0.5, 1.05)  # decays, a few above 1
    b = jax.random.normal(kb, (4, 32), jnp.float32)
    h = np.asarray(_kernel_reverse(a, b))
    expected = _numpy_reverse(np.asarray(a, np.float64), np.asarray(b, np.float64))
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-5)
    # Every step and channel matters: the forward recurrence, or the channels swapped, differ.
    assert not np.allclose(h, _numpy_reverse(np.asarray(a)[:, ::-1], np.asarray(b)[:, ::-1])[:, ::-1], atol=1e-3)
    assert not np.allclose(h[[1, 0, 2, 3]], expected, atol=1e-3)


def test_steps_cross_every_lane_boundary():
    # b = 1 only at the last step, a = 2 everywhere: h_t = 2^(31 - t), which reaches step 0 only
    # through all 7 lane boundaries of a channel's segment and never leaks into another channel.
    a = jnp.full((4, 32), 2.0, jnp.float32).at[2].set(0.5)
    b = jnp.zeros((4, 32), jnp.float32).at[:, 31].set(1.0).at[3, 31].set(0.0)
    h = np.asarray(_kernel_reverse(a, b))
    steps = np.arange(32)
    np.testing.assert_array_equal(h[0], 2.0 ** (31 - steps))
    np.testing.assert_array_equal(h[1], 2.0 ** (31 - steps))
    np.testing.assert_allclose(h[2], 0.5 ** (31 - steps), rtol=1e-6)
    np.testing.assert_array_equal(h[3], np.zeros(32))
