"""Pallas (Triton backend) kernels of the Mamba-1 selective scan: fused forward and backward.

Each program owns one batch element and `block_d` channels and walks the sequence in order,
keeping the state h (d_state, block_d) in float32 registers. Layouts are chosen so every value
is 2-D and broadcasts without transposes inside the kernel:
  u, delta, z, y, dy: (seq, block_d) blocks, one (1, block_d) row per step;
  B^T, C^T: (d_state, seq) blocks, one (d_state, 1) column per step;
  A^T: (d_state, block_d); the state h: (d_state, block_d).
The forward writes y once and the state only at chunk boundaries; the backward walks chunks in
reverse, recomputes the chunk's states from its boundary state into a small scratch buffer, then
runs the adjoint recurrence dh_{t-1} = exp(Δ_t A) dh_t backwards through the chunk.
This is the only backend-specific file: a Mosaic GPU or TPU version replaces these two calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan import triton_calls

F32 = jnp.float32


def _softplus(x):
    # log(1 + e^x), exact to float32 above 20 where the log1p branch would overflow.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _row(ref, t):
    """Row t of a (seq, block_d) ref as float32 (1, block_d)."""
    return pltriton.load(ref.at[pl.ds(t, 1), :]).astype(F32)


def _col(ref, t):
    """Column t of a (d_state, seq) ref as float32 (d_state, 1)."""
    return pltriton.load(ref.at[:, pl.ds(t, 1)]).astype(F32)


def _pipelined_loop(steps, load, body, carry, depth):
    """for j in range(steps): carry = body(j, load(j), carry), with loads issued `depth` steps early.

    The recurrence serialises the steps, but their inputs do not depend on it: carrying a ring of
    the next `depth` steps' loaded inputs lets their memory latency overlap the current step's
    math. `load(j)` must accept any j >= 0: loads past the range are clamped by the caller and unused.
    """
    if depth == 0:
        return lax.fori_loop(0, steps, lambda j, c: body(j, load(j), c), carry)
    ring = tuple(load(i) for i in range(depth))

    def step(j, state):
        c, ring = state
        upcoming = load(j + depth)
        return body(j, ring[0], c), ring[1:] + (upcoming,)

    return lax.fori_loop(0, steps, step, (carry, ring))[0]


def _step_inputs(t, u_ref, delta_ref, bt_ref, ct_ref, bias, softplus):
    u = _row(u_ref, t)
    pre = _row(delta_ref, t) + bias
    dt = _softplus(pre) if softplus else pre
    return u, pre, dt, _col(bt_ref, t), _col(ct_ref, t)


def _forward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, h0_ref,
                    y_ref, chunk_states_ref, final_ref, *, seq, chunk, softplus, has_z, prefetch):
    a = pltriton.load(at_ref).astype(F32)  # (d_state, block_d)
    d_skip = pltriton.load(d_ref).astype(F32)  # (1, block_d)
    bias = pltriton.load(bias_ref).astype(F32)

    def chunk_body(c, h):
        pltriton.store(chunk_states_ref.at[c], h)  # the state entering chunk c, for the backward
        start = c * chunk

        def load(j):
            t = jnp.minimum(start + j, seq - 1)
            u, _, dt, b, cc = _step_inputs(t, u_ref, delta_ref, bt_ref, ct_ref, bias, softplus)
            return u, dt, b, cc, (_row(z_ref, t) if has_z else u)

        def step(j, inputs, h):
            u, dt, b, cc, z = inputs
            h = jnp.exp(dt * a) * h + b * (dt * u)  # (d_state, block_d)
            y = jnp.sum(h * cc, axis=0, keepdims=True) + d_skip * u
            if has_z:
                y = y * z * _sigmoid(z)
            pltriton.store(y_ref.at[pl.ds(start + j, 1), :], y.astype(y_ref.dtype))
            return h

        return _pipelined_loop(jnp.minimum(chunk, seq - start), load, step, h, prefetch)

    num_chunks = chunk_states_ref.shape[0]
    h = lax.fori_loop(0, num_chunks, chunk_body, pltriton.load(h0_ref).astype(F32))
    pltriton.store(final_ref, h)


def _backward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, chunk_states_ref,
                     dy_ref, dfinal_ref,
                     du_ref, ddelta_ref, dz_ref, dbt_ref, dct_ref, da_ref, dd_ref, dbias_ref, dh0_ref,
                     scratch_ref, *, seq, chunk, softplus, has_z, prefetch):
    a = pltriton.load(at_ref).astype(F32)
    d_skip = pltriton.load(d_ref).astype(F32)
    bias = pltriton.load(bias_ref).astype(F32)
    num_chunks = chunk_states_ref.shape[0]

    def chunk_body(i, carry):
        dh, da_acc, dd_acc, dbias_acc = carry
        c = num_chunks - 1 - i
        start = c * chunk
        stop = jnp.minimum(start + chunk, seq)

        def load_forward(j):
            t = jnp.minimum(start + j, seq - 1)
            u, _, dt, b, _ = _step_inputs(t, u_ref, delta_ref, bt_ref, ct_ref, bias, softplus)
            return u, dt, b

        def recompute(j, inputs, h):  # states h_{t-1} of this chunk into scratch (recomputed, never stored)
            u, dt, b = inputs
            pltriton.store(scratch_ref.at[j], h)
            return jnp.exp(dt * a) * h + b * (dt * u)

        _pipelined_loop(stop - start, load_forward, recompute, pltriton.load(chunk_states_ref.at[c]), prefetch)

        def load_backward(j):
            t = jnp.maximum(stop - 1 - j, 0)
            u, pre, dt, b, cc = _step_inputs(t, u_ref, delta_ref, bt_ref, ct_ref, bias, softplus)
            h_prev = pltriton.load(scratch_ref.at[jnp.maximum(t - start, 0)])
            return u, pre, dt, b, cc, h_prev, _row(dy_ref, t), (_row(z_ref, t) if has_z else u)

        def adjoint(j, inputs, carry):
            dh, da_acc, dd_acc, dbias_acc = carry
            t = stop - 1 - j
            u, pre, dt, b, cc, h_prev, dy, z = inputs
            decay = jnp.exp(dt * a)
            h = decay * h_prev + b * (dt * u)
            if has_z:  # y = (C·h + D u) * silu(z)
                sig = _sigmoid(z)
                y_pre = jnp.sum(h * cc, axis=0, keepdims=True) + d_skip * u
                pltriton.store(dz_ref.at[pl.ds(t, 1), :],
                               (dy * y_pre * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype))
                dy = dy * z * sig
            dd_acc = dd_acc + dy * u
            pltriton.store(dct_ref.at[:, pl.ds(t, 1)], jnp.sum(h * dy, axis=1, keepdims=True))
            dh = dh + cc * dy
            # h_t = decay * h_{t-1} + Δ u B with decay = exp(Δ A).
            d_decay = dh * h_prev * decay  # d loss / d(Δ A)
            da_acc = da_acc + d_decay * dt
            dh_b = jnp.sum(dh * b, axis=0, keepdims=True)  # (1, block_d)
            d_dt = jnp.sum(d_decay * a, axis=0, keepdims=True) + dh_b * u
            pltriton.store(dbt_ref.at[:, pl.ds(t, 1)], jnp.sum(dh * (dt * u), axis=1, keepdims=True))
            pltriton.store(du_ref.at[pl.ds(t, 1), :], (dh_b * dt + dy * d_skip).astype(du_ref.dtype))
            d_pre = d_dt * _sigmoid(pre) if softplus else d_dt
            pltriton.store(ddelta_ref.at[pl.ds(t, 1), :], d_pre.astype(ddelta_ref.dtype))
            return dh * decay, da_acc, dd_acc, dbias_acc + d_pre

        return _pipelined_loop(stop - start, load_backward, adjoint, (dh, da_acc, dd_acc, dbias_acc), prefetch)

    zeros_row = jnp.zeros(d_skip.shape, F32)
    init = (pltriton.load(dfinal_ref).astype(F32), jnp.zeros(a.shape, F32), zeros_row, zeros_row)
    dh, da_acc, dd_acc, dbias_acc = lax.fori_loop(0, num_chunks, chunk_body, init)
    pltriton.store(dh0_ref, dh)
    pltriton.store(da_ref, da_acc)
    pltriton.store(dd_ref, dd_acc)
    pltriton.store(dbias_ref, dbias_acc)


_STATIC = ("chunk", "block_d", "softplus", "has_z", "num_warps", "prefetch", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(u, delta, z, bt, ct, at, d, bias, h0, *, chunk, block_d, softplus, has_z, num_warps, prefetch, interpret):
    """Shapes as `triton_calls.forward_call`: y, the states entering each chunk, the final state."""
    kernel = functools.partial(_forward_kernel, seq=u.shape[1], chunk=chunk, softplus=softplus, has_z=has_z,
                               prefetch=prefetch)
    return triton_calls.forward_call(kernel, u, delta, z, bt, ct, at, d, bias, h0, chunk=chunk, block_d=block_d,
                                     num_warps=num_warps, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal, *, chunk, block_d, softplus, has_z,
             num_warps, prefetch, interpret):
    """Gradients in the layouts of `layouts.backward_out_shapes` (per-block partials reduced by the caller)."""
    kernel = functools.partial(_backward_kernel, seq=u.shape[1], chunk=chunk, softplus=softplus, has_z=has_z,
                               prefetch=prefetch)
    return triton_calls.backward_call(kernel, u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal,
                                      block_d=block_d, num_warps=num_warps, interpret=interpret, scratch_rows=chunk)
