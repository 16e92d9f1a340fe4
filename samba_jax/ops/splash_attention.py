"""Sliding-window attention through jax's TPU splash attention kernel (block-sparse: key blocks
outside the causal band are skipped, so the cost grows with seq * window, not seq^2).

GQA runs as splash's MQA variant once per KV head (its group of query heads shares that key and
value), so K and V are never repeated. Off TPU the same kernel runs in Pallas interpret mode
(tests). The mask is built per (sequence, window, group) at trace time and cached.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

_MAX_BLOCK = 512  # MaxText's default splash tiles on v5/v6; short sequences use one 128-multiple tile


def _block(seq: int) -> int:
    return min(_MAX_BLOCK, 128 * -(-seq // 128))


@functools.lru_cache(maxsize=32)
def _kernel(padded: int, window: int, group: int, block: int, interpret: bool):
    band = mask_lib.LocalMask((padded, padded), (window - 1, 0), offset=0)  # i - window < j <= i
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(mask_lib.MultiHeadMask([band] * group), block_sizes=sizes,
                                                interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block_size: int | None = None
                     ) -> jax.Array:
    """q: (batch, seq, q_heads, head_dim); k, v: (batch, seq, kv_heads, head_dim); window in [1, seq].
    block_size: splash's q/kv tile (a multiple of 128; None: up to 512). Returns q's shape and dtype."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    block = block_size or _block(seq)
    padded = block * -(-seq // block)  # padded keys come after every real query: causality hides them
    pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    kernel = _kernel(padded, window, group, block, jax.default_backend() != "tpu")
    qg = (q * (1.0 / math.sqrt(head_dim))).astype(q.dtype)  # splash does not scale the logits
    qg = qg.reshape(batch, padded, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)  # (b, kv, g, s, d)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kv, s, d)
    out = jax.vmap(jax.vmap(kernel))(qg, kg, vg)  # (b, kv, g, s, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, padded, q_heads, head_dim)[:, :seq].astype(q.dtype)
