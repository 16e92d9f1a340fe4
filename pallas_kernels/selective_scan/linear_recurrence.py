"""`linear_recurrence(a, b)`: h_t = a_t * h_{t-1} + b_t along one axis of a tile, inside a Pallas kernel.

Pallas' Triton backend lowers only `cumsum` to Triton's parallel scan (`tt.scan`); a first-order
linear recurrence needs the same scan with the combine (a1, b1), (a2, b2) -> (a1 a2, a2 b1 + b2).
This module adds that as a primitive: on GPU it lowers to one `tt.scan` (log-depth across threads,
so a tile of T steps costs far less than T dependent steps); everywhere else, including Pallas
interpret mode on CPU, it is the plain step-by-step loop (`lax.scan`). (It was
`lax.associative_scan` with the same combine until 2026-12-07: the same values to float32
rounding, but its log-depth slices and pads made the interpret-mode kernels' programs half again
as large and about twice as slow for XLA to compile on a CPU, which is most of the kernel tests' time.)

The Triton lowering uses jax's private Pallas-Triton lowering API (`jax._src.pallas.triton.lowering`),
pinned by the exact jax version in setup.py; tests/pallas_kernels checks both paths against a loop.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import mlir


def reference(a, b, axis: int = 0, reverse: bool = False):
    """Plain-JAX definition, one step at a time: forward h_t = a_t h_{t-1} + b_t (h_{-1} = 0);
    reverse h_t = a_t h_{t+1} + b_t (zero after the last step)."""

    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    steps_first = (jnp.moveaxis(a, axis, 0), jnp.moveaxis(b, axis, 0))
    _, h = lax.scan(step, jnp.zeros_like(steps_first[1][0]), steps_first, reverse=reverse)
    return jnp.moveaxis(h, 0, axis)


linear_recurrence_p = jex_core.Primitive("linear_recurrence")
linear_recurrence_p.def_abstract_eval(lambda a, b, *, axis, reverse: b)
linear_recurrence_p.def_impl(lambda a, b, *, axis, reverse: reference(a, b, axis, reverse))
mlir.register_lowering(
    linear_recurrence_p,
    mlir.lower_fun(lambda a, b, *, axis, reverse: reference(a, b, axis, reverse), multiple_results=False))


def linear_recurrence(a, b, axis: int = 0, reverse: bool = False):
    """h with h_t = a_t h_{t-1} + b_t (reverse: h_t = a_t h_{t+1} + b_t), zero before the first step.

    a, b: float32 arrays of one shape; axis: the step axis. Returns h, shaped like b.
    """
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"a and b must match, got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    return linear_recurrence_p.bind(a, b, axis=axis % a.ndim, reverse=bool(reverse))


def _register_triton_lowering():
    try:
        from jax._src.lib.mlir import ir
        from jax._src.lib.triton import dialect as tt_dialect
        from jax._src.pallas.triton import lowering as triton_lowering
    except ImportError:  # a jaxlib without the Triton dialect: only interpret mode and other backends
        return

    def rule(ctx, a, b, *, axis, reverse):
        element = triton_lowering._element_type(b.type)
        scan = tt_dialect.ScanOp([a, b], axis, reverse=reverse)
        # Triton folds (accumulated, next) in scan order, which for reverse=True runs from the end.
        body = scan.regions[0].blocks.append(element, element, element, element)
        with ir.InsertionPoint.at_block_begin(body):
            a1, b1, a2, b2 = body.arguments
            a12 = triton_lowering.arith_dialect.mulf(a1, a2)
            b12 = triton_lowering.arith_dialect.addf(triton_lowering.arith_dialect.mulf(a2, b1), b2)
            tt_dialect.scan_return([a12, b12])
        scan.verify()
        return list(scan.result)[1]

    triton_lowering.triton_lowering_rules[linear_recurrence_p] = rule


_register_triton_lowering()
