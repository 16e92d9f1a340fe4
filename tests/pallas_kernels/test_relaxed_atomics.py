"""`relaxed_atomics.add_relaxed`: atomic adds without fences, from many programs into one accumulator.

Interpret mode on CPU; on a GPU (`JAX_PLATFORMS=cuda python -m pytest tests/pallas_kernels`) the
real relaxed reductions."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan import relaxed_atomics

INTERPRET = jax.default_backend() == "cpu"


def _accumulate(x):
    """x (programs, 4, 32): every program adds its block into rows 1..4 of one (8, 32) accumulator."""

    def kernel(x_ref, acc_in_ref, acc_ref):
        del acc_in_ref  # aliased to acc_ref
        relaxed_atomics.add_relaxed(acc_ref, (pl.ds(1, 4), pl.ds(0, 32)), pltriton.load(x_ref))

    return pl.pallas_call(
        kernel, grid=(x.shape[0],),
        in_specs=[pl.BlockSpec((None, 4, 32), lambda i: (i, 0, 0)), pl.BlockSpec((8, 32), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((8, 32), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((8, 32), jnp.float32), input_output_aliases={1: 0},
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1), interpret=INTERPRET,
    )(x, jnp.full((8, 32), 0.5, jnp.float32))


def test_adds_from_every_program_land_once():
    x = jax.random.normal(jax.random.key(0), (37, 4, 32), jnp.float32)
    acc = np.asarray(_accumulate(x))
    expected = np.full((8, 32), 0.5, np.float32)
    expected[1:5] += np.asarray(x).sum(axis=0)
    np.testing.assert_allclose(acc, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(acc[1:5], 0.5 + np.asarray(x)[-1], atol=1e-3)  # not a store of one program's block
