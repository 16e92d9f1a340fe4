"""`channel_sums`: the backward's sums over a tile's 4 channels, 4 rows at once, by warp shuffles.

On a CPU the contracts run in plain jnp (Pallas interpret mode); on a GPU
(`JAX_PLATFORMS=cuda python -m pytest tests/pallas_kernels/test_channel_sums.py`) the same kernel
runs the shuffles inside Triton's layout of a (4, 32) tile on one warp, the layout they assume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan import channel_sums

INTERPRET = jax.default_backend() == "cpu"


def test_applies_only_to_the_layout_it_assumes():
    assert channel_sums.applies(4, 32, 1, 16) and channel_sums.applies(4, 32, 1, 8)
    for block_d, chunk, warps, d_state in [(8, 32, 1, 16), (4, 16, 1, 16), (4, 64, 1, 16), (4, 32, 2, 16),
                                           (2, 32, 1, 16), (4, 32, 1, 2)]:
        assert not channel_sums.applies(block_d, chunk, warps, d_state)


def _kernel_sums(rows):
    """rows (4, 4, chunk): pair_sums, quad_sums and the four-row sums, as one kernel computes them."""
    chunk = rows.shape[-1]

    def kernel(x0_ref, x1_ref, x2_ref, x3_ref, pair_ref, quad_ref, sums_ref):
        channel = channel_sums.channel_index(chunk)
        x = [pltriton.load(ref) for ref in (x0_ref, x1_ref, x2_ref, x3_ref)]
        p01 = channel_sums.pair_sums(x[0], x[1], channel, interpret=INTERPRET)
        p23 = channel_sums.pair_sums(x[2], x[3], channel, interpret=INTERPRET)
        pltriton.store(pair_ref, p01)
        pltriton.store(quad_ref, channel_sums.quad_sums(x[0], x[1], channel, interpret=INTERPRET))
        pltriton.store(sums_ref, channel_sums.quad_sums(p01, p23, channel, interpret=INTERPRET))

    out = jax.ShapeDtypeStruct((4, chunk), jnp.float32)
    return pl.pallas_call(kernel, out_shape=[out] * 3,
                          compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
                          interpret=INTERPRET)(*rows)


@pytest.mark.parametrize("seed", [0, 1])
def test_pair_quad_and_four_row_sums_against_numpy(seed):
    rows = jax.random.normal(jax.random.key(seed), (4, 4, 32), jnp.float32)  # (row, channel, step)
    pair, quad, sums = (np.asarray(v) for v in _kernel_sums(rows))
    x = np.asarray(rows)
    for c in range(4):
        np.testing.assert_allclose(pair[c], x[c & 1, c] + x[c & 1, c ^ 1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(quad[c], x[c >> 1, c] + x[c >> 1, c ^ 2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sums, x.sum(axis=1), rtol=1e-5, atol=1e-5)  # row r: sum over channels of rows[r]


def test_rows_are_not_interchangeable():
    # Swapping two input rows moves their sums: the checks above see which row went where.
    rows = jax.random.normal(jax.random.key(2), (4, 4, 32), jnp.float32)
    sums = np.asarray(_kernel_sums(rows)[2])
    swapped = np.asarray(_kernel_sums(rows[jnp.array([1, 0, 2, 3])])[2])
    assert not np.allclose(sums, swapped)
    np.testing.assert_allclose(swapped[[1, 0, 2, 3]], sums, rtol=1e-5, atol=1e-5)
