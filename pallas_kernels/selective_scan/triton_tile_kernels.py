"""Pallas (Triton backend) kernels of the Mamba-1 selective scan: fused forward and backward.

Each program owns one batch element and `block_d` channels and walks the sequence in tiles of
`chunk` steps. Inside a tile nothing is serial: the inputs of all steps are loaded at once, and for
each state n the recurrence h_t = exp(Δ_t A_n) h_{t-1} + Δ_t B_tn u_t over the tile's steps is one
parallel scan (`linear_recurrence`, Triton's tt.scan) of (chunk, block_d) float32 values, like
mamba_ssm's block scan. The state carried from tile to tile is d_state rows of (1, block_d).
  u, delta, z, y, dy: (chunk, block_d) tiles of (seq, block_d) blocks;
  B^T, C^T: (chunk,) rows of (d_state, seq) blocks, one per state;
  A^T: (d_state, block_d), read once.
Steps past the end of the sequence get Δ = 0 (so exp(ΔA) = 1 and ΔBu = 0: the state passes
through unchanged) and are never stored. The forward stores y once and the state at each tile start.
The backward walks tiles in reverse: it recomputes the tile's states from the saved one, runs the
adjoint recurrence dh_t = C_t dy_t + exp(Δ_{t+1} A) dh_{t+1} as a reverse scan, and accumulates
every gradient without storing anything of size seq * d_state * d.

Measured on an H200 (BENCHMARKS.md) this is 2-3.5x slower than the step-by-step `triton_kernels` at
the training shapes and compiles in 35-110 s, so it is not the default (backend="triton_tile" picks
it). It is kept as the starting point for a layout that keeps the step axis inside a warp.
TODO(issue 3): reach mamba_ssm's speed (a Mosaic GPU kernel, or Triton layouts Pallas can't set).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan import triton_calls
from pallas_kernels.selective_scan.linear_recurrence import linear_recurrence

F32 = jnp.float32
LOG2E = math.log2(math.e)  # exp(x) = exp2(x log2 e): exp2 is one special-function instruction


def _softplus(x):
    # log(1 + e^x), exact to float32 above 20 where the log1p branch would overflow.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _load(ref, mask=None):
    return pltriton.load(ref, mask=mask, other=0.0 if mask is not None else None).astype(F32)


class _Tile:
    """Masks and per-step inputs of the tile starting at `start`: (chunk, block_d) unless noted."""

    def __init__(self, start, chunk, block_d, seq):
        self.local = lax.broadcasted_iota(jnp.int32, (chunk, block_d), 0)
        self.valid = self.local + start < seq
        self.valid_row = lax.broadcasted_iota(jnp.int32, (chunk,), 0) + start < seq  # (chunk,)
        self.start, self.chunk = start, chunk

    def rows(self, ref, offset=0):
        if offset:
            mask = self.local + (self.start + offset) < ref.shape[0]
            return _load(ref.at[pl.ds(self.start + offset, self.chunk), :], mask)
        return _load(ref.at[pl.ds(self.start, self.chunk), :], self.valid)

    def column(self, ref, n):
        """State n's values at the tile's steps, (chunk, 1), from a (d_state, seq) ref."""
        return _load(ref.at[jnp.int32(n), pl.ds(self.start, self.chunk)], self.valid_row)[:, None]

    def delta(self, delta_ref, bias, softplus, offset=0):
        """(pre-activation, Δ) with Δ = 0 past the sequence end."""
        pre = self.rows(delta_ref, offset) + bias
        valid = self.valid if not offset else self.local + (self.start + offset) < delta_ref.shape[0]
        return pre, jnp.where(valid, _softplus(pre) if softplus else pre, 0.0)

    def last(self, x):
        """Row chunk-1 of x as (1, block_d)."""
        return jnp.sum(jnp.where(self.local == self.chunk - 1, x, 0.0), axis=0, keepdims=True)

    def first(self, x):
        return jnp.sum(jnp.where(self.local == 0, x, 0.0), axis=0, keepdims=True)


def _forward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, h0_ref,
                    y_ref, chunk_states_ref, final_ref, *, seq, chunk, softplus, has_z):
    d_state, block_d = at_ref.shape
    a2 = [_load(at_ref.at[pl.ds(n, 1), :]) * LOG2E for n in range(d_state)]  # (1, block_d) each
    d_skip, bias = _load(d_ref), _load(bias_ref)

    def tile_body(c, h):
        tile = _Tile(c * chunk, chunk, block_d, seq)
        u = tile.rows(u_ref)
        _, dt = tile.delta(delta_ref, bias, softplus)
        dtu = dt * u
        y = d_skip * u
        carried = []
        for n in range(d_state):
            pltriton.store(chunk_states_ref.at[c, pl.ds(n, 1), :], h[n])  # the state entering tile c
            decay = jnp.exp2(dt * a2[n])
            drive = dtu * tile.column(bt_ref, n)
            drive = jnp.where(tile.local == 0, drive + decay * h[n], drive)  # the carried state enters step 0
            states = linear_recurrence(decay, drive)
            y = y + states * tile.column(ct_ref, n)
            carried.append(tile.last(states))
        if has_z:
            z = tile.rows(z_ref)
            y = y * z * _sigmoid(z)
        pltriton.store(y_ref.at[pl.ds(tile.start, chunk), :], y.astype(y_ref.dtype), mask=tile.valid)
        return tuple(carried)

    h0 = tuple(_load(h0_ref.at[pl.ds(n, 1), :]) for n in range(d_state))
    h = lax.fori_loop(0, chunk_states_ref.shape[0], tile_body, h0)
    for n in range(d_state):
        pltriton.store(final_ref.at[pl.ds(n, 1), :], h[n])


def _backward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, chunk_states_ref,
                     dy_ref, dfinal_ref,
                     du_ref, ddelta_ref, dz_ref, dbt_ref, dct_ref, da_ref, dd_ref, dbias_ref, dh0_ref,
                     *, seq, chunk, softplus, has_z):
    d_state, block_d = at_ref.shape
    a = [_load(at_ref.at[pl.ds(n, 1), :]) for n in range(d_state)]
    d_skip, bias = _load(d_ref), _load(bias_ref)
    num_tiles = chunk_states_ref.shape[0]

    def tile_body(i, carry):
        # dh_in[n]: d loss / d h at this tile's last step from later steps; da[n]: dA rows so far.
        dh_in, da, dd_acc, dbias_acc = carry
        c = num_tiles - 1 - i
        tile = _Tile(c * chunk, chunk, block_d, seq)
        u = tile.rows(u_ref)
        pre, dt = tile.delta(delta_ref, bias, softplus)
        _, dt_next = tile.delta(delta_ref, bias, softplus, offset=1)  # Δ_{t+1}, for the adjoint
        dtu = dt * u
        dy = tile.rows(dy_ref)
        if has_z:
            z = tile.rows(z_ref)
            sig = _sigmoid(z)
            dy_gate = dy * z * sig  # dy through the silu(z) gate
        else:
            dy_gate = dy
        y_pre = d_skip * u
        du = dy_gate * d_skip
        d_dt = jnp.zeros_like(u)
        dh_out, da_out = [], []
        for n in range(d_state):
            decay = jnp.exp2(dt * (a[n] * LOG2E))
            b_col, c_col = tile.column(bt_ref, n), tile.column(ct_ref, n)
            drive = dtu * b_col
            entering = _load(chunk_states_ref.at[c, pl.ds(n, 1), :])
            states = linear_recurrence(decay, jnp.where(tile.local == 0, drive + decay * entering, drive))
            y_pre = y_pre + states * c_col
            # Adjoint: dh_t = C_t dy_t + exp(Δ_{t+1} A) dh_{t+1}; the last step takes dh_in instead.
            source = dy_gate * c_col
            source = jnp.where(tile.local == chunk - 1, source + dh_in[n], source)
            dh = linear_recurrence(jnp.exp2(dt_next * (a[n] * LOG2E)), source, reverse=True)
            # h_t = decay h_{t-1} + drive: decay * h_{t-1} = states - drive; d/dΔ exp(ΔA) = A exp(ΔA).
            d_decayed = dh * (states - drive)  # d loss / d(ΔA)
            da_out.append(da[n] + jnp.sum(d_decayed * dt, axis=0, keepdims=True))
            dh_b = dh * b_col
            d_dt = d_dt + d_decayed * a[n] + dh_b * u
            du = du + dh_b * dt
            pltriton.store(dbt_ref.at[jnp.int32(n), pl.ds(tile.start, chunk)], jnp.sum(dh * dtu, axis=1),
                           mask=tile.valid_row)
            pltriton.store(dct_ref.at[jnp.int32(n), pl.ds(tile.start, chunk)], jnp.sum(states * dy_gate, axis=1),
                           mask=tile.valid_row)
            dh_out.append(tile.first(dh * decay))  # into the previous tile's last state
        if has_z:  # y = y_pre * silu(z)
            pltriton.store(dz_ref.at[pl.ds(tile.start, chunk), :],
                           (dy * y_pre * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype), mask=tile.valid)
        d_pre = jnp.where(tile.valid, d_dt * _sigmoid(pre) if softplus else d_dt, 0.0)
        pltriton.store(du_ref.at[pl.ds(tile.start, chunk), :], du.astype(du_ref.dtype), mask=tile.valid)
        pltriton.store(ddelta_ref.at[pl.ds(tile.start, chunk), :], d_pre.astype(ddelta_ref.dtype),
                       mask=tile.valid)
        dd_acc = dd_acc + jnp.sum(dy_gate * u, axis=0, keepdims=True)
        dbias_acc = dbias_acc + jnp.sum(d_pre, axis=0, keepdims=True)
        return tuple(dh_out), tuple(da_out), dd_acc, dbias_acc

    zeros = jnp.zeros((1, block_d), F32)
    dfinal = tuple(_load(dfinal_ref.at[pl.ds(n, 1), :]) for n in range(d_state))
    dh, da, dd_acc, dbias_acc = lax.fori_loop(0, num_tiles, tile_body, (dfinal, (zeros,) * d_state, zeros, zeros))
    for n in range(d_state):
        pltriton.store(dh0_ref.at[pl.ds(n, 1), :], dh[n])
        pltriton.store(da_ref.at[pl.ds(n, 1), :], da[n])
    pltriton.store(dd_ref, dd_acc)
    pltriton.store(dbias_ref, dbias_acc)


_STATIC = ("chunk", "block_d", "softplus", "has_z", "num_warps", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(u, delta, z, bt, ct, at, d, bias, h0, *, chunk, block_d, softplus, has_z, num_warps, interpret):
    """Shapes as `triton_calls.forward_call`: y, the states entering each chunk, the final state."""
    kernel = functools.partial(_forward_kernel, seq=u.shape[1], chunk=chunk, softplus=softplus, has_z=has_z)
    return triton_calls.forward_call(kernel, u, delta, z, bt, ct, at, d, bias, h0, chunk=chunk, block_d=block_d,
                                     num_warps=num_warps, interpret=interpret)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal, *, chunk, block_d, softplus, has_z,
             num_warps, interpret):
    """Gradients in the layouts of `layouts.backward_out_shapes` (per-block partials reduced by the caller)."""
    kernel = functools.partial(_backward_kernel, seq=u.shape[1], chunk=chunk, softplus=softplus, has_z=has_z)
    return triton_calls.backward_call(kernel, u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal,
                                      block_d=block_d, num_warps=num_warps, interpret=interpret)
