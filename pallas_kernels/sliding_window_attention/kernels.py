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
from the saved log-sum-exp.
Inputs are padded by the caller to a multiple of the block; positions >= seq are masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
_NEG = -1e30  # finite: a row whose block holds no visible key stays finite (its lse is never used)


def _band_mask(q_pos, k_pos, window, seq):
    """(block_q, block_k) visibility: causal, within the window, and a real key."""
    return (k_pos <= q_pos) & (k_pos > q_pos - window) & (k_pos < seq)


def _key_blocks(q_start, block_q, block_k, window):
    """[first, last) key blocks that intersect the band of queries q_start .. q_start + block_q - 1."""
    first = jnp.maximum(q_start - window + 1, 0) // block_k
    last = (q_start + block_q - 1) // block_k + 1
    return first, last


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, window, seq, block_q, block_k):
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]  # (block_q, head_dim), native dtype: the dots run on tensor cores, accumulating in f32
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, carry):
        m, l, acc = carry
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        s = jnp.dot(q, k.T, preferred_element_type=F32) * scale  # (block_q, block_k)
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        s = jnp.where(_band_mask(q_pos, k_pos, window, seq), s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=1, keepdims=True)
        acc = acc * correction + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)
        return m_new, l, acc

    first, last = _key_blocks(q_start, block_q, block_k, window)
    head_dim = q_ref.shape[-1]
    init = (jnp.full((block_q, 1), _NEG, F32), jnp.zeros((block_q, 1), F32), jnp.zeros((block_q, head_dim), F32))
    m, l, acc = lax.fori_loop(first, last, body, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log(l))[:, 0]


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, window, seq,
                block_q, block_k, group, num_q_blocks):
    k_start = pl.program_id(2) * block_k
    k = k_ref[...]  # (block_k, head_dim)
    v = v_ref[...]
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    # Query blocks that can see this key block: queries k_start .. k_start + block_k - 1 + window - 1.
    first = k_start // block_q
    last = jnp.minimum((k_start + block_k - 1 + window - 1) // block_q + 1, num_q_blocks)

    def over_heads(g, carry):
        def body(i, carry):
            dk, dv = carry
            q_start = i * block_q
            q = q_ref[g, pl.ds(q_start, block_q), :]
            do = do_ref[g, pl.ds(q_start, block_q), :]
            lse = lse_ref[g, pl.ds(q_start, block_q)][:, None]
            delta = delta_ref[g, pl.ds(q_start, block_q)][:, None]
            q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
            s = jnp.dot(q, k.T, preferred_element_type=F32) * scale
            p = jnp.where(_band_mask(q_pos, k_pos, window, seq), jnp.exp(s - lse), 0.0)  # (block_q, block_k)
            dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=F32)
            dp = jnp.dot(do, v.T, preferred_element_type=F32)
            ds = p * (dp - delta)
            dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=F32) * scale
            return dk, dv

        return lax.fori_loop(first, last, body, carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = lax.fori_loop(0, group, over_heads, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, window, seq, block_q, block_k):
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_pos = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, dq):
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        s = jnp.dot(q, k.T, preferred_element_type=F32) * scale
        p = jnp.where(_band_mask(q_pos, k_pos, window, seq), jnp.exp(s - lse), 0.0)
        ds = p * (jnp.dot(do, v.T, preferred_element_type=F32) - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32) * scale

    first, last = _key_blocks(q_start, block_q, block_k, window)
    dq = lax.fori_loop(first, last, body, jnp.zeros(q.shape, F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


_STATIC = ("window", "seq", "block_q", "block_k", "num_warps", "interpret")


def _heads_first(x):  # (batch, seq, heads, d) -> (batch, heads, seq, d): one (seq, d) plane per head
    return jnp.swapaxes(x, 1, 2)


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(q, k, v, *, window, seq, block_q, block_k, num_warps, interpret):
    """q: (batch, padded, q_heads, d); k, v: (batch, padded, kv_heads, d). Returns o (q's layout)
    and lse (batch, q_heads, padded) float32."""
    batch, padded, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    kernel = functools.partial(_forward_kernel, scale=head_dim ** -0.5, window=window, seq=seq, block_q=block_q,
                               block_k=block_k)
    kv_spec = pl.BlockSpec((None, None, padded, head_dim), lambda b, h, i: (b, h // group, 0, 0))
    o, lse = pl.pallas_call(
        kernel,
        grid=(batch, q_heads, padded // block_q),
        in_specs=[pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0)), kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0)),
                   pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qh.shape, q.dtype), jax.ShapeDtypeStruct((batch, q_heads, padded), F32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="swa_fwd",
    )(qh, kh, vh)
    return _heads_first(o), lse


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(q, k, v, o, lse, do, *, window, seq, block_q, block_k, num_warps, interpret):
    """Gradients dq, dk, dv in the inputs' layouts."""
    batch, padded, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1).swapaxes(1, 2)  # (batch, q_heads, padded)
    qh, kh, vh, doh = _heads_first(q), _heads_first(k), _heads_first(v), _heads_first(do)
    common = dict(scale=head_dim ** -0.5, window=window, seq=seq, block_q=block_q, block_k=block_k)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=2)

    # dK, dV: grid over KV heads; each program reads its group's query heads (a (group, seq, d) slab).
    group_spec = pl.BlockSpec((None, group, padded, head_dim), lambda b, h, j: (b, h, 0, 0))
    group_rows = pl.BlockSpec((None, group, padded), lambda b, h, j: (b, h, 0))
    kv_block = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, group=group, num_q_blocks=padded // block_q, **common),
        grid=(batch, kv_heads, padded // block_k),
        in_specs=[group_spec, kv_block, kv_block, group_spec, group_rows, group_rows],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="swa_bwd_dkv",
    )(qh, kh, vh, doh, lse, delta)

    q_block = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    rows = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    kv_spec = pl.BlockSpec((None, None, padded, head_dim), lambda b, h, i: (b, h // group, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common),
        grid=(batch, q_heads, padded // block_q),
        in_specs=[q_block, kv_spec, kv_spec, q_block, rows, rows],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="swa_bwd_dq",
    )(qh, kh, vh, doh, lse, delta)
    return _heads_first(dq), _heads_first(dk), _heads_first(dv)
