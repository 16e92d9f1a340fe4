"""Chunk queries against a position-tagged KV cache (samba_jax/ops/cache_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax.ops.cache_attention import attention_over_cache, write_chunk


def _dense(q, keys, values, q_pos, k_pos, window):
    """Plain masked softmax attention in float32 over explicit positions (the oracle)."""
    groups = q.shape[2] // keys.shape[2]
    keys, values = jnp.repeat(keys, groups, axis=2), jnp.repeat(values, groups, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / np.sqrt(q.shape[-1])
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    visible = (kp >= 0) & (kp <= qp) & ((kp > qp - window) if window else True)
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, values)


@pytest.mark.parametrize("window", [None, 1, 5, 13])
@pytest.mark.parametrize("block", [3, 1024])
def test_equals_dense_attention_over_a_scrambled_partly_empty_cache(window, block):
    rng = np.random.RandomState(0)
    batch, chunk, heads, kv_heads, hd, slots, start = 2, 7, 4, 2, 8, 11, 9
    q = jnp.asarray(rng.randn(batch, chunk, heads, hd), jnp.float32)
    k, v = (jnp.asarray(rng.randn(batch, chunk, kv_heads, hd), jnp.float32) for _ in range(2))
    k_cache, v_cache = (jnp.asarray(rng.randn(batch, slots, kv_heads, hd), jnp.float32) for _ in range(2))
    held = rng.permutation(slots)[:start]  # positions 0..start-1 in scrambled slots, the rest empty
    cache_pos = np.full((batch, slots), -1, np.int32)
    cache_pos[:, held] = np.arange(start)
    q_pos = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
    got = attention_over_cache(q, k, v, q_pos, k_cache, v_cache, jnp.asarray(cache_pos), window, block=block)
    want = _dense(q, jnp.concatenate([k_cache, k], 1), jnp.concatenate([v_cache, v], 1), q_pos,
                  jnp.concatenate([jnp.asarray(cache_pos), q_pos], 1), window)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_write_chunk_keeps_the_latest_position_of_each_slot():
    slots = 4
    cache = jnp.zeros((1, slots, 1))
    pos = jnp.full((1, slots), -1, jnp.int32)
    q_pos = jnp.arange(3, 9, dtype=jnp.int32)[None]  # a chunk longer than the ring
    k = q_pos[..., None].astype(jnp.float32)
    cache, pos = write_chunk(cache, pos, k, q_pos)
    assert pos.tolist() == [[8, 5, 6, 7]]  # slot p % 4 holds p, for the last 4 positions
    assert cache[0, :, 0].tolist() == [8, 5, 6, 7]


def test_mismatched_cache_is_named():
    q = jnp.zeros((1, 2, 2, 4))
    k = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="cache_positions must be"):
        attention_over_cache(q, k, k, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 3, 1, 4)), jnp.zeros((1, 3, 1, 4)),
                             jnp.zeros((1, 4), jnp.int32), None)
