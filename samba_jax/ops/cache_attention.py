"""A chunk of queries against a KV cache of earlier positions plus the chunk's own keys.

Streaming evaluation (samba_jax/evaluate/streaming.py) feeds a long document chunk by chunk. Each
attention sublayer keeps a buffer of the keys and values of earlier positions (a ring of `window`
slots for SWA, a cache of the whole context for full attention), each slot tagged with the absolute
position it holds (-1: empty). The chunk's queries attend to those slots and to the chunk's own keys
under the causal (and window) mask of the absolute positions, so the result equals the full-sequence
attention for those queries. Shapes stay fixed from chunk to chunk (one compile), and the work per
chunk is chunk × (slots + chunk), linear in the length for SWA.

The keys are visited in blocks with an online softmax (flash-attention's running max `m` and
normaliser `l`), so memory is batch · heads · chunk · block, never chunk × context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def attention_over_cache(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                         k_cache: jax.Array, v_cache: jax.Array, cache_positions: jax.Array,
                         window: int | None, block: int = 1024) -> jax.Array:
    """q: (batch, chunk, q_heads, head_dim); k, v: (batch, chunk, kv_heads, head_dim), the chunk's
    keys and values (rotated); q_positions: (batch, chunk) int32 absolute positions of the chunk;
    k_cache, v_cache: (batch, slots, kv_heads, head_dim); cache_positions: (batch, slots) int32, the
    position each slot holds or -1. A query at p sees keys at p' with p' <= p, p' >= 0 and
    p - window < p' (window None: no lower bound). Returns (batch, chunk, q_heads, head_dim) in q's dtype.
    """
    batch, chunk, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide q_heads={q_heads}")
    if k_cache.shape[0] != batch or k_cache.shape[2:] != k.shape[2:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must be (batch, slots, "
                         f"kv_heads, head_dim) = ({batch}, slots, {kv_heads}, {head_dim})")
    if cache_positions.shape != k_cache.shape[:2]:
        raise ValueError(f"cache_positions must be (batch, slots) = {k_cache.shape[:2]}, got {cache_positions.shape}")
    groups = q_heads // kv_heads
    keys = jnp.concatenate([k_cache.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([v_cache.astype(v.dtype), v], axis=1)
    key_positions = jnp.concatenate([cache_positions, q_positions], axis=1).astype(jnp.int32)
    total = keys.shape[1]
    block = min(block, total)
    pad = -total % block
    if pad:  # padded keys carry position -1: masked like empty slots
        keys = jnp.pad(keys, ((0, 0), (0, pad), (0, 0), (0, 0)))
        values = jnp.pad(values, ((0, 0), (0, pad), (0, 0), (0, 0)))
        key_positions = jnp.pad(key_positions, ((0, 0), (0, pad)), constant_values=-1)
    blocks = keys.shape[1] // block

    def by_block(a):  # (batch, blocks * block, ...) -> (blocks, batch, block, ...)
        return jnp.moveaxis(a.reshape((batch, blocks, block) + a.shape[2:]), 1, 0)

    # Matmuls in the inputs' dtype (bf16 on accelerators) with float32 accumulation; softmax in float32.
    qg = (q.astype(F32) * head_dim ** -0.5).astype(q.dtype).reshape(batch, chunk, kv_heads, groups, head_dim)
    qp = q_positions[:, None, None, :, None]  # (batch, 1, 1, chunk, 1)

    def step(carry, xs):
        m, l, acc = carry  # (batch, kv, groups, chunk), same, (batch, kv, groups, chunk, head_dim)
        kb, vb, pb = xs  # (batch, block, kv, head_dim), same, (batch, block)
        s = jnp.einsum("bckgd,bskd->bkgcs", qg, kb.astype(q.dtype), preferred_element_type=F32)
        kp = pb[:, None, None, None, :]
        visible = (kp >= 0) & (kp <= qp)
        if window is not None:
            visible &= kp > qp - window
        m_new = jnp.maximum(m, jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1))
        p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
        scale = jnp.exp(m - m_new)  # m = -inf only while nothing was visible, and then l = acc = 0
        scale = jnp.where(jnp.isfinite(m_new), scale, 0.0)
        l = l * scale + jnp.sum(p, axis=-1)
        acc = acc * scale[..., None] + jnp.einsum("bkgcs,bskd->bkgcd", p.astype(vb.dtype), vb,
                                                  preferred_element_type=F32)
        return (m_new, l, acc), None

    init = (jnp.full((batch, kv_heads, groups, chunk), -jnp.inf, F32), jnp.zeros((batch, kv_heads, groups, chunk), F32),
            jnp.zeros((batch, kv_heads, groups, chunk, head_dim), F32))
    (_, l, acc), _ = jax.lax.scan(step, init, (by_block(keys), by_block(values), by_block(key_positions)))
    out = acc / l[..., None]  # every query sees at least its own key, so l > 0
    return jnp.moveaxis(out, 3, 1).reshape(batch, chunk, q_heads, head_dim).astype(q.dtype)


def write_chunk(k_cache: jax.Array, cache_positions: jax.Array, k: jax.Array, q_positions: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """The cache after the chunk: slot p % slots takes position p's key, for the last min(chunk, slots)
    positions (earlier ones would be overwritten anyway, and distinct positions then hit distinct slots).

    k_cache: (batch, slots, ...); cache_positions: (batch, slots); k: (batch, chunk, ...);
    q_positions: (batch, chunk), consecutive. Returns the new (k_cache, cache_positions).
    """
    slots, chunk = k_cache.shape[1], k.shape[1]
    kept = min(chunk, slots)
    k, q_positions = k[:, chunk - kept:], q_positions[:, chunk - kept:]
    rows = jnp.arange(k.shape[0])[:, None]
    slot = q_positions % slots
    return (k_cache.at[rows, slot].set(k.astype(k_cache.dtype)),
            cache_positions.at[rows, slot].set(q_positions.astype(cache_positions.dtype)))
