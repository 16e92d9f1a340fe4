"""The memory target of the fused scan: no (seq, d_inner, d_state)-sized array per batch element outside the
kernels, and what its gradient holds grows linearly in seq. Read from the traced gradient (no compilation):
every array an equation outputs, outside the Pallas kernels' own bodies."""

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jax_core

from pallas_kernels.selective_scan import selective_scan as fused
from samba_jax import ops

BATCH, WIDTH, D_STATE = 2, 64, 16


def intermediate_sizes(jaxpr) -> list[int]:
    """Element counts of every equation's outputs, recursing into sub-jaxprs except a kernel's body."""
    sizes = []
    for eqn in jaxpr.eqns:
        sizes += [v.aval.size for v in eqn.outvars if hasattr(v.aval, "size")]
        if eqn.primitive.name == "pallas_call":
            continue  # its body is the kernel, on chip
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax_core.Jaxpr):
                    sizes += intermediate_sizes(sub)
    return sizes


def gradient_sizes(scan, seq, **options):
    k = jax.random.split(jax.random.key(0), 5)
    args = dict(u=jax.random.normal(k[0], (BATCH, seq, WIDTH)), delta=jax.random.normal(k[1], (BATCH, seq, WIDTH)),
                A=-jnp.ones((WIDTH, D_STATE)), B=jax.random.normal(k[2], (BATCH, seq, D_STATE)),
                C=jax.random.normal(k[3], (BATCH, seq, D_STATE)), D=jnp.ones((WIDTH,)),
                z=jax.random.normal(k[4], (BATCH, seq, WIDTH)), delta_bias=jnp.zeros((WIDTH,)))
    loss = lambda a: jnp.sum(scan(**a, delta_softplus=True, **options))  # noqa: E731
    return intermediate_sizes(jax.make_jaxpr(jax.grad(loss))(args).jaxpr)


@pytest.mark.parametrize("tuning", [None, dict(bwd_atomic_cols=1)], ids=["partials", "atomic"])
def test_fused_gradient_holds_no_state_sized_array_and_grows_linearly_in_seq(tuning):
    small, large = (gradient_sizes(fused, seq, tuning=tuning) for seq in (512, 1024))
    states = BATCH * 1024 * WIDTH * D_STATE  # (batch, seq, d_inner, d_state) at the larger seq
    # Largest by default: the backward's dB, dC partial sums (batch, d_inner / 4, d_state, seq), a quarter of
    # that; with atomic adds, the per-step inputs and outputs (batch, seq, d_inner).
    assert max(large) <= (states // 4 if tuning is None else states // D_STATE), max(large)
    assert 1.9 <= sum(large) / sum(small) <= 2.1, (sum(small), sum(large))


def test_the_measure_catches_a_scan_that_holds_every_state():
    # The associative scan holds (batch, seq, d_inner, d_state) arrays: the check above must see them.
    sizes = gradient_sizes(ops.selective_scan, 512, implementation="associative")
    assert max(sizes) >= BATCH * 512 * WIDTH * D_STATE
