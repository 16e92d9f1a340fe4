"""`linear_recurrence` (the scan primitive inside the Triton kernels) against a Python loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan.linear_recurrence import linear_recurrence


def loop(a, b, axis, reverse):
    a, b = np.moveaxis(np.asarray(a, np.float64), axis, 0), np.moveaxis(np.asarray(b, np.float64), axis, 0)
    h, out = np.zeros(a.shape[1:]), np.zeros(a.shape)
    order = range(a.shape[0] - 1, -1, -1) if reverse else range(a.shape[0])
    for t in order:
        h = a[t] * h + b[t]
        out[t] = h
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("shape,axis", [((1,), 0), ((37,), 0), ((64, 8), 0), ((8, 33), 1), ((3, 16, 5), 1)])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_a_loop_forward_and_reverse(shape, axis, reverse):
    ka, kb = jax.random.split(jax.random.key(len(shape) + axis))
    a = jax.random.uniform(ka, shape, minval=0.5, maxval=1.0)
    b = jax.random.normal(kb, shape)
    got = jax.jit(lambda a, b: linear_recurrence(a, b, axis, reverse))(a, b)
    np.testing.assert_allclose(got, loop(a, b, axis, reverse), rtol=1e-5, atol=1e-5)


def test_order_of_the_combine_matters():
    # A loop in the wrong direction gives a different answer, so the test above can fail.
    a, b = jnp.array([0.5, 0.25, 0.75]), jnp.array([1.0, 2.0, 3.0])
    assert not np.allclose(linear_recurrence(a, b), loop(a, b, 0, reverse=True))


def test_mismatched_operands_are_refused():
    with pytest.raises(ValueError, match="must match"):
        linear_recurrence(jnp.ones(4), jnp.ones(5))


@pytest.mark.parametrize("reverse", [False, True])
def test_inside_a_pallas_kernel(reverse):
    """The lowering that kernels use: Triton's tt.scan on a GPU, interpret mode on CPU."""
    from jax.experimental import pallas as pl

    def kernel(a_ref, b_ref, h_ref):
        h_ref[...] = linear_recurrence(a_ref[...], b_ref[...], axis=0, reverse=reverse)

    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.uniform(ka, (64, 32), minval=0.5, maxval=1.0)
    b = jax.random.normal(kb, (64, 32))
    got = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(b.shape, b.dtype),
                         interpret=jax.default_backend() == "cpu")(a, b)
    np.testing.assert_allclose(got, loop(a, b, 0, reverse), rtol=1e-5, atol=1e-5)
