"""Flash-style sliding-window attention in Pallas (Triton backend on GPU; interpret mode on CPU).

Forward: one program per (batch, query head, query block) keeps the running max, normaliser and
output of an online softmax over only the key blocks that intersect its band
[q_start - window + 1, q_end]: the loop's bounds come from the program id, so blocks outside the
band cost nothing and the work per token is flat in the sequence length. It stores the output and
the log-sum-exp of each row for the backward. GQA: the K/V BlockSpecs pick KV head h // group, so
K and V are read in place, never repeated.
Backward (FlashAttention-2's split): one kernel per (batch, KV head, key block) accumulates dK and
dV over the query blocks in the band and over the group's query heads; another per (batch, query
head, query block) accumulates dQ over the key blocks in the band. Probabilities are recomputed
from the saved log-sum-exp. Every loop masks only the blocks on the band's edges (the diagonal,
the window's far end, the sequence end); the blocks wholly inside it skip the mask. Softmax runs in
base 2 (exp2 with log2 e folded into the scale). Each kernel has its own `Tile`.
Inputs are padded by the caller to a multiple of every block; positions >= seq are masked.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32


class Tile(NamedTuple):
    """One kernel's tiling: query and key rows per block (powers of two >= 16), Triton warps and
    software-pipelining stages (K/V loads issued that many blocks ahead)."""
    block_q: int
    block_k: int
    warps: int
    stages: int


class Tiles(NamedTuple):
    """The forward's, the dK/dV kernel's and the dQ kernel's tiles."""
    fwd: Tile
    dkv: Tile
    dq: Tile


LOG2E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x log2 e), one special-function instruction
_NEG = -1e30  # finite: a row whose block holds no visible key stays finite (its lse is never used)


def _band_mask(q_pos, k_pos, window, seq):
    """(block_q, block_k) visibility: causal, within the window, and a real key."""
    return (k_pos <= q_pos) & (k_pos > q_pos - window) & (k_pos < seq)


def _key_blocks(q_start, block_q, block_k, window, seq):
    """Key blocks [first, last) that intersect the band of queries q_start .. q_start + block_q - 1,
    and [full_first, full_last), those every one of these queries sees whole (no mask needed)."""
    first = jnp.maximum(q_start - window + 1, 0) // block_k
    last = (q_start + block_q - 1) // block_k + 1
    full_first = (jnp.maximum(q_start + block_q - window, 0) + block_k - 1) // block_k  # keys > q_end - window
    full_last = jnp.minimum((q_start + 1) // block_k, seq // block_k)  # keys <= q_start, and real
    return first, last, full_first, full_last


def _query_blocks(k_start, block_q, block_k, window, seq, num_q_blocks):
    """Query blocks [first, last) that see any key of k_start .. k_start + block_k - 1, and
    [full_first, full_last), those whose every query sees every one of these keys."""
    first = k_start // block_q
    last = jnp.minimum((k_start + block_k - 1 + window - 1) // block_q + 1, num_q_blocks)
    full_first = (k_start + block_k - 1 + block_q - 1) // block_q  # q_start >= the block's last key
    full_last = jnp.where(k_start + block_k <= seq, (k_start + window) // block_q, 0)  # q_end - window < k_start
    return first, last, full_first, full_last


def _banded_loop(first, last, full_first, full_last, body, carry):
    """body(i, carry, masked) over [first, last): without the mask on the blocks wholly inside the
    band (most of them once the window spans several blocks), with it on the band's edges."""
    full_first = jnp.clip(full_first, first, last)
    full_last = jnp.clip(full_last, full_first, last)
    carry = lax.fori_loop(first, full_first, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_first, full_last, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_last, last, functools.partial(body, masked=True), carry)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, window, seq, block_q, block_k):
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]  # (block_q, head_dim), native dtype: the dots run on tensor cores, accumulating in f32
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, carry, masked):
        m, l, acc = carry  # running max and normaliser in base 2, unnormalised output
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=F32) * (scale * LOG2E)  # (block_q, block_k)
        if masked:
            k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            s = jnp.where(_band_mask(q_pos, k_pos, window, seq), s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp2(s - m_new)
        correction = jnp.exp2(m - m_new)
        l = l * correction + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * correction + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)
        return m_new, l, acc

    head_dim = q_ref.shape[-1]
    init = (jnp.full((block_q, 1), _NEG, F32), jnp.zeros((block_q, 1), F32), jnp.zeros((block_q, head_dim), F32))
    m, l, acc = _banded_loop(*_key_blocks(q_start, block_q, block_k, window, seq), body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l))[:, 0]  # base 2: the backward recomputes p = exp2(s log2 e - lse)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, window, seq,
                block_q, block_k, group, num_q_blocks):
    k_start = pl.program_id(2) * block_k
    k = k_ref[...]  # (block_k, head_dim)
    v = v_ref[...]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    blocks = _query_blocks(k_start, block_q, block_k, window, seq, num_q_blocks)

    def over_heads(g, carry):
        def body(i, carry, masked):
            dk, dv = carry
            q_start = i * block_q
            q = q_ref[pl.ds(q_start, block_q), g, :]
            do = do_ref[pl.ds(q_start, block_q), g, :]
            lse = lse_ref[g, pl.ds(q_start, block_q)][:, None]
            delta = delta_ref[g, pl.ds(q_start, block_q)][:, None]
            p = jnp.exp2(jnp.dot(q, k.T, preferred_element_type=F32) * (scale * LOG2E) - lse)  # (block_q, block_k)
            if masked:
                q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
                p = jnp.where(_band_mask(q_pos, k_pos, window, seq), p, 0.0)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=F32)
            dp = jnp.dot(do, v.T, preferred_element_type=F32)
            ds = p * (dp - delta)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=F32)
            return dk, dv

        return _banded_loop(*blocks, body, carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, group, over_heads, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, window, seq, block_q, block_k):
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, dq, masked):
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        p = jnp.exp2(jnp.dot(q, k.T, preferred_element_type=F32) * (scale * LOG2E) - lse)
        if masked:
            k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
            p = jnp.where(_band_mask(q_pos, k_pos, window, seq), p, 0.0)
        ds = p * (jnp.dot(do, v.T, preferred_element_type=F32) - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32)

    dq = _banded_loop(*_key_blocks(q_start, block_q, block_k, window, seq), body, jnp.zeros(q.shape, F32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


_STATIC = ("window", "seq", "tiles", "interpret")


def _params(tile):
    return pltriton.CompilerParams(num_warps=tile.warps, num_stages=tile.stages)


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(q, k, v, *, window, seq, tiles, interpret):
    """q: (batch, padded, q_heads, d); k, v: (batch, padded, kv_heads, d); tiles: a `Tiles` (padded a
    multiple of every block). Returns o (q's layout) and the base-2 lse (batch, q_heads, padded) f32.
    No transposes: the blocks index the (batch, seq, heads, head_dim) inputs in place."""
    batch, padded, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    t = tiles.fwd
    kernel = functools.partial(_forward_kernel, scale=head_dim ** -0.5, window=window, seq=seq, block_q=t.block_q,
                               block_k=t.block_k)
    # Blocks index the (batch, seq, heads, head_dim) arrays in place: each row a contiguous head_dim.
    q_spec = pl.BlockSpec((None, t.block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, padded, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    return pl.pallas_call(
        kernel,
        grid=(batch, q_heads, padded // t.block_q),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, t.block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, q_heads, padded), F32)],
        compiler_params=_params(t),
        interpret=interpret,
        name="swa_fwd",
    )(q, k, v)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(q, k, v, o, lse, do, *, window, seq, tiles, interpret):
    """Gradients dq, dk, dv in the inputs' layouts."""
    batch, padded, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1).swapaxes(1, 2)  # (batch, q_heads, padded)
    common = dict(scale=head_dim ** -0.5, window=window, seq=seq)

    # dK, dV: grid over KV heads; each program reads its group's query heads (a (seq, group, d) slab).
    t = tiles.dkv
    group_spec = pl.BlockSpec((None, padded, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    group_rows = pl.BlockSpec((None, group, padded), lambda b, h, j: (b, h, 0))
    kv_block = pl.BlockSpec((None, t.block_k, None, head_dim), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, group=group, num_q_blocks=padded // t.block_q, block_q=t.block_q,
                          block_k=t.block_k, **common),
        grid=(batch, kv_heads, padded // t.block_k),
        in_specs=[group_spec, kv_block, kv_block, group_spec, group_rows, group_rows],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(t), interpret=interpret, name="swa_bwd_dkv",
    )(q, k, v, do, lse, delta)

    t = tiles.dq
    q_block = pl.BlockSpec((None, t.block_q, None, head_dim), lambda b, h, i: (b, i, h, 0))
    rows = pl.BlockSpec((None, None, t.block_q), lambda b, h, i: (b, h, i))
    kv_spec = pl.BlockSpec((None, padded, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=t.block_q, block_k=t.block_k, **common),
        grid=(batch, q_heads, padded // t.block_q),
        in_specs=[q_block, kv_spec, kv_spec, q_block, rows, rows],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(t), interpret=interpret, name="swa_bwd_dq",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv
