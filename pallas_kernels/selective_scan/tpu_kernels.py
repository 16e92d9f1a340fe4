"""Pallas (Mosaic TPU) kernels of the Mamba-1 selective scan: fused forward and backward.

Drop-in for `triton_kernels` (same signatures, layouts and outputs), shaped like axlearn's TPU
kernel: grid (batch, d / block_d, seq / seq_tile) with the sequence axis "arbitrary" (sequential)
and the others "parallel". BlockSpecs DMA one (seq_tile, block_d) tile of u, Δ, z, y and one
(d_state, seq_tile) tile of B^T, C^T per grid step; the state h (d_state, block_d) lives in a
float32 VMEM scratch that persists across the seq tiles of one (batch, d-block) and a fori_loop
walks the tile's steps. Chunks are seq tiles: the forward saves the state entering each tile.
The backward visits seq tiles in reverse, carries dh (and the per-batch dA^T, dD, dbias sums) in
VMEM scratch, recomputes the tile's states into a (seq_tile, d_state, block_d) scratch and runs
the adjoint recurrence backwards through it. The seq axis is padded here to a multiple of
seq_tile; padded steps get Δ = 0 (the state passes unchanged) and are sliced off the outputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.selective_scan import layouts

F32 = jnp.float32
SUBLANES, LANES = 8, 128  # the float32 vreg tile


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def seq_tile(chunk_size: int, seq: int, interpret: bool) -> int:
    """Steps per seq tile: a multiple of 8 (sublanes of the (seq_tile, block_d) tiles). On hardware
    also a multiple of 128 unless one tile covers the sequence, because B^T/C^T tiles put the
    sequence on lanes and Mosaic blocks must be (8, 128)-aligned or span the whole axis."""
    tile = _round_up(max(1, min(chunk_size, seq)), SUBLANES)
    if not interpret and tile < seq:
        tile = _round_up(tile, LANES)
    return tile


def _softplus(x):
    # log(1 + e^x), exact to float32 above 20 where the log1p branch would overflow.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _column(tile, lanes, j):
    """Column j of a (d_state, seq_tile) value as (d_state, 1), by a masked lane reduction:
    vector ops only, no slice at a dynamic lane offset."""
    return jnp.sum(jnp.where(lanes == j, tile, 0.0), axis=1, keepdims=True)


class _Tile:
    """Per-step inputs of one grid step's tile; `seq` is the unpadded length (masks padded steps)."""

    def __init__(self, u_ref, delta_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, *, start, seq, softplus):
        self.u_ref, self.delta_ref, self.start, self.seq, self.softplus = u_ref, delta_ref, start, seq, softplus
        self.a = at_ref[...].astype(F32)  # (d_state, block_d)
        self.d_skip = d_ref[...].astype(F32)  # (1, block_d)
        self.bias = bias_ref[...].astype(F32)
        self.bt = bt_ref[...].astype(F32)  # (d_state, seq_tile)
        self.ct = ct_ref[...].astype(F32)
        self.lanes = lax.broadcasted_iota(jnp.int32, self.bt.shape, 1)
        self.masked = seq % u_ref.shape[0] != 0  # static: only a padded last tile needs the mask

    def step(self, j):
        """u, pre-activation, Δ (0 on padded steps), B_t column, valid flag for step j of the tile."""
        u = self.u_ref[pl.ds(j, 1), :].astype(F32)  # (1, block_d)
        pre = self.delta_ref[pl.ds(j, 1), :].astype(F32) + self.bias
        dt = _softplus(pre) if self.softplus else pre
        valid = self.start + j < self.seq
        if self.masked:
            dt = jnp.where(valid, dt, 0.0)  # exp(0·A) = 1 and Δ u B = 0: the state passes unchanged
        return u, pre, dt, _column(self.bt, self.lanes, j), valid


def _forward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, h0_ref,
                    y_ref, chunk_state_ref, final_ref, h_ref, *, seq, softplus, has_z):
    s, tile = pl.program_id(2), u_ref.shape[0]

    @pl.when(s == 0)
    def _():
        h_ref[...] = h0_ref[...].astype(F32)

    chunk_state_ref[...] = h_ref[...]  # the state entering this tile, for the backward
    x = _Tile(u_ref, delta_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, start=s * tile, seq=seq,
              softplus=softplus)

    def step(j, h):
        u, _, dt, b, _ = x.step(j)
        h = jnp.exp(dt * x.a) * h + b * (dt * u)  # (d_state, block_d)
        y = jnp.sum(h * _column(x.ct, x.lanes, j), axis=0, keepdims=True) + x.d_skip * u
        if has_z:
            z = z_ref[pl.ds(j, 1), :].astype(F32)
            y = y * z * _sigmoid(z)
        y_ref[pl.ds(j, 1), :] = y.astype(y_ref.dtype)
        return h

    h_ref[...] = lax.fori_loop(0, tile, step, h_ref[...])

    @pl.when(s == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = h_ref[...]


def _backward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, chunk_state_ref,
                     dy_ref, dfinal_ref,
                     du_ref, ddelta_ref, dz_ref, dbt_ref, dct_ref, da_ref, dd_ref, dbias_ref, dh0_ref,
                     dh_ref, da_acc_ref, dd_acc_ref, dbias_acc_ref, states_ref, *, seq, softplus, has_z):
    s, last, tile = pl.program_id(2), pl.num_programs(2) - 1, u_ref.shape[0]

    @pl.when(s == 0)  # the last seq tile: start from the final-state cotangent, zero the sums
    def _():
        dh_ref[...] = dfinal_ref[...].astype(F32)
        da_acc_ref[...] = jnp.zeros(da_acc_ref.shape, F32)
        dd_acc_ref[...] = jnp.zeros(dd_acc_ref.shape, F32)
        dbias_acc_ref[...] = jnp.zeros(dbias_acc_ref.shape, F32)

    x = _Tile(u_ref, delta_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, start=(last - s) * tile, seq=seq,
              softplus=softplus)

    def recompute(j, h):  # states h_{t-1} of this tile into scratch (recomputed, never stored in HBM)
        u, _, dt, b, _ = x.step(j)
        states_ref[j] = h
        return jnp.exp(dt * x.a) * h + b * (dt * u)

    lax.fori_loop(0, tile, recompute, chunk_state_ref[...].astype(F32))

    def adjoint(i, carry):
        dh, da_acc, dd_acc, dbias_acc, dbt, dct = carry
        j = tile - 1 - i
        u, pre, dt, b, valid = x.step(j)
        cc = _column(x.ct, x.lanes, j)
        dy = dy_ref[pl.ds(j, 1), :].astype(F32)
        h_prev = states_ref[j]
        decay = jnp.exp(dt * x.a)
        h = decay * h_prev + b * (dt * u)
        if has_z:  # y = (C·h + D u) * silu(z)
            z = z_ref[pl.ds(j, 1), :].astype(F32)
            sig = _sigmoid(z)
            y_pre = jnp.sum(h * cc, axis=0, keepdims=True) + x.d_skip * u
            dz_ref[pl.ds(j, 1), :] = (dy * y_pre * sig * (1.0 + z * (1.0 - sig))).astype(dz_ref.dtype)
            dy = dy * z * sig
        dd_acc = dd_acc + dy * u
        dct = jnp.where(x.lanes == j, jnp.sum(h * dy, axis=1, keepdims=True), dct)
        dh = dh + cc * dy
        # h_t = decay * h_{t-1} + Δ u B with decay = exp(Δ A).
        d_decay = dh * h_prev * decay  # d loss / d(Δ A)
        da_acc = da_acc + d_decay * dt
        dh_b = jnp.sum(dh * b, axis=0, keepdims=True)  # (1, block_d)
        d_dt = jnp.sum(d_decay * x.a, axis=0, keepdims=True) + dh_b * u
        dbt = jnp.where(x.lanes == j, jnp.sum(dh * (dt * u), axis=1, keepdims=True), dbt)
        du_ref[pl.ds(j, 1), :] = (dh_b * dt + dy * x.d_skip).astype(du_ref.dtype)
        d_pre = d_dt * _sigmoid(pre) if softplus else d_dt
        if x.masked:
            d_pre = jnp.where(valid, d_pre, 0.0)  # Δ was pinned to 0 on padded steps
        ddelta_ref[pl.ds(j, 1), :] = d_pre.astype(ddelta_ref.dtype)
        return dh * decay, da_acc, dd_acc, dbias_acc + d_pre, dbt, dct

    zeros_cols = jnp.zeros(x.bt.shape, F32)
    init = (dh_ref[...], da_acc_ref[...], dd_acc_ref[...], dbias_acc_ref[...], zeros_cols, zeros_cols)
    dh, da_acc, dd_acc, dbias_acc, dbt, dct = lax.fori_loop(0, tile, adjoint, init)
    dh_ref[...], da_acc_ref[...], dd_acc_ref[...], dbias_acc_ref[...] = dh, da_acc, dd_acc, dbias_acc
    dbt_ref[...] = dbt  # each tile owns its (d_state, seq_tile) slice of the per-block partials
    dct_ref[...] = dct

    @pl.when(s == last)  # the first seq tile: the per-batch sums and dh0 are complete
    def _():
        dh0_ref[...] = dh
        da_ref[...] = da_acc
        dd_ref[...] = dd_acc
        dbias_ref[...] = dbias_acc


def _specs(d_state, block_d, tile, num_tiles, reverse):
    """BlockSpecs for grid (batch, d_blocks, seq_tiles), keyed by layout; `reverse` walks seq tiles
    last to first."""
    tix = (lambda s: num_tiles - 1 - s) if reverse else (lambda s: s)
    def per_batch(b, j, s):
        return (b, 0, j)  # resident across seq tiles
    return {
        "row": pl.BlockSpec((None, tile, block_d), lambda b, j, s: (b, tix(s), j)),  # (batch, seq, d)
        "col": pl.BlockSpec((None, d_state, tile), lambda b, j, s: (b, 0, tix(s))),  # (batch, d_state, seq)
        "param": pl.BlockSpec((d_state, block_d), lambda b, j, s: (0, j)),  # (d_state, d)
        "vec": pl.BlockSpec((1, block_d), lambda b, j, s: (0, j)),  # (1, d)
        "state": pl.BlockSpec((None, d_state, block_d), per_batch),  # (batch, d_state, d)
        "batch_vec": pl.BlockSpec((None, 1, block_d), per_batch),  # (batch, 1, d)
        "chunk": pl.BlockSpec((None, None, d_state, block_d), lambda b, j, s: (b, tix(s), 0, j)),
        "partial_col": pl.BlockSpec((None, None, d_state, tile), lambda b, j, s: (b, j, 0, tix(s))),
    }


def _pad_seq(x, axis, padded):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, padded - x.shape[axis])
    return jnp.pad(x, pad) if padded != x.shape[axis] else x


def _compiler_params(interpret):
    params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return params, (pltpu.InterpretParams() if interpret else False)


_STATIC = ("chunk", "block_d", "softplus", "has_z", "num_warps", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(u, delta, z, bt, ct, at, d, bias, h0, *, chunk, block_d, softplus, has_z, num_warps,
            interpret):
    """u, delta, z: (batch, seq, d) with d % block_d == 0; bt, ct: (batch, d_state, seq); at: (d_state, d);
    d, bias: (1, d); h0: (batch, d_state, d) f32; chunk: the seq tile, a multiple of 8 (see `seq_tile`).
    Returns y (batch, seq, d) in u's dtype, chunk states (batch, num_chunks, d_state, d) f32 and the
    final state (batch, d_state, d) f32. num_warps is a Triton knob, ignored here."""
    del num_warps
    batch, seq, width = u.shape
    d_state = at.shape[0]
    num_tiles = pl.cdiv(seq, chunk)
    padded = num_tiles * chunk
    u, delta, z = (_pad_seq(x, 1, padded) for x in (u, delta, z))
    bt, ct = (_pad_seq(x, 2, padded) for x in (bt, ct))
    s = _specs(d_state, block_d, chunk, num_tiles, reverse=False)
    params, interpret = _compiler_params(interpret)
    y, chunk_states, final = pl.pallas_call(
        functools.partial(_forward_kernel, seq=seq, softplus=softplus, has_z=has_z),
        grid=(batch, width // block_d, num_tiles),
        in_specs=[s["row"], s["row"], s["row"], s["col"], s["col"], s["param"], s["vec"], s["vec"], s["state"]],
        out_specs=[s["row"], s["chunk"], s["state"]],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((batch, num_tiles, d_state, width), F32),
                   jax.ShapeDtypeStruct((batch, d_state, width), F32)],
        scratch_shapes=[pltpu.VMEM((d_state, block_d), F32)],  # h, carried across seq tiles
        compiler_params=params,
        interpret=interpret,
        name="selective_scan_tpu_fwd",
    )(u, delta, z, bt, ct, at, d, bias, h0)
    return y[:, :seq], chunk_states, final


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal, *, chunk, block_d, softplus, has_z,
             num_warps, interpret):
    """Gradients in the forward's layouts. Partials (reduced by the caller, as for Triton): dB^T, dC^T
    (batch, d_blocks, d_state, seq), one slice per (d-block, seq tile); dA^T (batch, d_state, d) and
    dD, dbias (batch, 1, d), summed over seq tiles in VMEM scratch and written on the first tile."""
    del num_warps
    batch, seq, width = u.shape
    d_state = at.shape[0]
    num_tiles = chunk_states.shape[1]
    padded = num_tiles * chunk
    blocks = width // block_d
    u, delta, z, dy = (_pad_seq(x, 1, padded) for x in (u, delta, z, dy))  # padded dy = 0: no gradient
    bt, ct = (_pad_seq(x, 2, padded) for x in (bt, ct))
    s = _specs(d_state, block_d, chunk, num_tiles, reverse=True)
    params, interpret = _compiler_params(interpret)
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, seq=seq, softplus=softplus, has_z=has_z),
        grid=(batch, blocks, num_tiles),
        in_specs=[s["row"], s["row"], s["row"], s["col"], s["col"], s["param"], s["vec"], s["vec"], s["chunk"],
                  s["row"], s["state"]],
        out_specs=[s["row"], s["row"], s["row"], s["partial_col"], s["partial_col"], s["state"],
                   s["batch_vec"], s["batch_vec"], s["state"]],
        out_shape=layouts.backward_out_shapes(u, delta, z, blocks, d_state, padded),
        scratch_shapes=[pltpu.VMEM((d_state, block_d), F32),  # dh, carried across seq tiles
                        pltpu.VMEM((d_state, block_d), F32),  # dA^T sum
                        pltpu.VMEM((1, block_d), F32), pltpu.VMEM((1, block_d), F32),  # dD, dbias sums
                        pltpu.VMEM((chunk, d_state, block_d), F32)],  # the tile's recomputed states
        compiler_params=params,
        interpret=interpret,
        name="selective_scan_tpu_bwd",
    )(u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal)
    du, ddelta, dz, dbt, dct, dat, dd, dbias, dh0 = outs
    return du[:, :seq], ddelta[:, :seq], dz[:, :seq], dbt[..., :seq], dct[..., :seq], dat, dd, dbias, dh0
