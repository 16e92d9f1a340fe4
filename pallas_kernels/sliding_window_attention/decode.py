"""Decode-time attention in Pallas (flash decoding): one new query per sequence against a ring-buffer
KV cache, read once.

Semantics of `samba_jax.ops.sliding_window_attention_decode` (its "xla" implementation is the
reference): query position p_q sees the slots whose absolute position p satisfies p >= 0,
p <= p_q and, with a window, p > p_q - window; scale 1/sqrt(head_dim); a row with no visible slot
averages every slot uniformly (as the XLA path's finite mask value does).

Grid (batch, kv head, split): each program walks `split_len` slots of one KV head in blocks, for
the `group` query heads that share it, keeping an online softmax (running max, normaliser,
unnormalised output) per query head; the splits' partial results are merged by XLA afterwards
(a few KB). Splitting the cache keeps thousands of programs in flight, so the reads of K and V,
the whole cost at decode time, run near HBM bandwidth. The XLA path needs separate kernels for the
logits, the mask and max, the exponentials, the sum and the weighted sum of V.
  q: (batch, q_heads, head_dim); k, v: (batch, cache_len, kv_heads, head_dim), read in place;
  slot positions: (batch, cache_len) int32; position: (batch,) int32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
_NEG = -1e30  # finite, so a split (or row) with no visible slot stays finite and merges with weight 0


def default_splits(cache_len: int, block: int) -> int:
    """Cache splits: about 512 slots per program, at most 16 splits, at least one block each."""
    return max(1, min(16, cache_len // 512, -(-cache_len // block)))


def _kernel(q_ref, k_ref, v_ref, slot_ref, pos_ref, o_ref, m_ref, l_ref, *, scale, window, cache_len, split_len,
            block, group):
    start = pl.program_id(2) * split_len
    position = pos_ref[...]  # (1,)
    queries = [q_ref[g, :].astype(F32) * scale for g in range(group)]  # (head_dim,) each

    def body(j, carry):
        rows = start + j * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
        real = rows < cache_len
        window_rows = pl.ds(start + j * block, block)
        k = pltriton.load(k_ref.at[window_rows, :], mask=real[:, None], other=0.0).astype(F32)  # (block, head_dim)
        v = pltriton.load(v_ref.at[window_rows, :], mask=real[:, None], other=0.0).astype(F32)
        p = pltriton.load(slot_ref.at[window_rows], mask=real, other=-1)  # absolute position per slot
        visible = (p >= 0) & (p <= position)
        if window is not None:
            visible &= p > position - window
        out = []
        for g in range(group):
            m, l, acc = carry[g]
            s = jnp.where(visible, jnp.sum(k * queries[g][None, :], axis=1), _NEG)  # (block,)
            s = jnp.where(real, s, -jnp.inf)  # slots past the cache end take no part, even in a uniform row
            m_new = jnp.maximum(m, jnp.max(s))
            w = jnp.exp(s - m_new)
            correction = jnp.exp(m - m_new)
            out.append((m_new, l * correction + jnp.sum(w), acc * correction + jnp.sum(w[:, None] * v, axis=0)))
        return tuple(out)

    head_dim = q_ref.shape[-1]
    init = tuple((jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros((head_dim,), F32)) for _ in range(group))
    # Splits past the cache end (when cache_len is not a multiple of split_len) run no block.
    num_blocks = jnp.clip(pl.cdiv(cache_len - start, block), 0, split_len // block)
    result = lax.fori_loop(0, num_blocks, body, init)
    for g, (m, l, acc) in enumerate(result):
        o_ref[g, :] = acc
        m_ref[pl.ds(g, 1)] = jnp.broadcast_to(m, (1,))
        l_ref[pl.ds(g, 1)] = jnp.broadcast_to(l, (1,))


@functools.partial(jax.jit, static_argnames=("window", "block", "splits", "num_warps", "interpret"))
def attention_decode(q, k_cache, v_cache, cache_positions, position, *, window, block=64, splits=None,
                     num_warps=4, interpret=None):
    """Shapes and result as `samba_jax.ops.sliding_window_attention_decode` (inputs checked there).

    block: slots per loop step (a power of two); splits: programs per (sequence, KV head) along the
    cache (None: `default_splits`).
    """
    batch, cache_len, kv_heads, head_dim = k_cache.shape
    q_heads = q.shape[1]
    group = q_heads // kv_heads
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    splits = splits or default_splits(cache_len, block)
    split_len = block * -(-cache_len // (block * splits))  # a whole number of blocks
    kernel = functools.partial(_kernel, scale=1.0 / math.sqrt(head_dim), window=window, cache_len=cache_len,
                               split_len=split_len, block=block, group=group)
    kv_spec = pl.BlockSpec((None, cache_len, None, head_dim), lambda b, h, s: (b, 0, h, 0))
    part = lambda *tail: jax.ShapeDtypeStruct((batch, kv_heads, splits, *tail), F32)  # noqa: E731
    o, m, l = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[pl.BlockSpec((None, None, group, head_dim), lambda b, h, s: (b, h, 0, 0)), kv_spec, kv_spec,
                  pl.BlockSpec((None, cache_len), lambda b, h, s: (b, 0)),
                  pl.BlockSpec((None, 1), lambda b, h, s: (b, 0))],
        out_specs=[pl.BlockSpec((None, None, None, group, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, group), lambda b, h, s: (b, h, s, 0))],
        out_shape=[part(group, head_dim), part(group), part(group)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="swa_decode",
    )(q.reshape(batch, kv_heads, group, head_dim), k_cache, v_cache, cache_positions, position[:, None])
    # Merge the splits' online softmaxes (empty splits have m = -inf and weight 0).
    top = jnp.max(m, axis=2, keepdims=True)
    weight = jnp.exp(m - top)  # (batch, kv_heads, splits, group)
    total = jnp.sum(weight * l, axis=2)
    out = jnp.sum(weight[..., None] * o, axis=2) / total[..., None]  # (batch, kv_heads, group, head_dim)
    return out.reshape(batch, q_heads, head_dim).astype(q.dtype)
