"""Grouped-query attention with rotary embeddings: sliding-window ("swa") or full causal ("attn").

As the reference's `CausalSelfAttention`: no biases, NeoX rotary over the whole head at absolute
positions, scale 1/sqrt(head_dim), query i sees keys i-window < j <= i. The kernel choice lives in
`samba_jax.ops.sliding_window_attention`; this module only projects and rotates.
x: (batch, seq, d_model) -> (batch, seq, d_model).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from samba_jax import context_parallel, ops
from samba_jax.config import ModelConfig
from samba_jax.model.layers import Dense, apply_rotary
from samba_jax.model.mamba import DECODE_STATE
from samba_jax.ops.cache_attention import attention_over_cache


class Attention(nn.Module):
    """GQA attention; `window=None` is full causal attention."""

    cfg: ModelConfig
    window: int | None
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        batch, seq, _ = x.shape
        h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        q = Dense(h * hd, ("embed", "heads"), dtype, name="q_proj")(x).reshape(batch, seq, h, hd)
        k = Dense(kv * hd, ("embed", "kv_heads"), dtype, name="k_proj")(x).reshape(batch, seq, kv, hd)
        v = Dense(kv * hd, ("embed", "kv_heads"), dtype, name="v_proj")(x).reshape(batch, seq, kv, hd)
        q = apply_rotary(q, positions, cfg.rope_base)
        k = apply_rotary(k, positions, cfg.rope_base)

        options = dict(implementation=cfg.attention_implementation or None, block_size=cfg.attention_block or None)
        if self.is_mutable_collection(DECODE_STATE) and not self.is_initializing():  # prefill for generation
            previous = self.get_variable(DECODE_STATE, "previous") if self.has_variable(DECODE_STATE,
                                                                                         "previous") else None
            # The rotated keys and values, from which generate.py and the streaming scorer update their caches.
            if previous is not None and "positions" in previous:  # streaming: a cache tagged by position
                self.sow(DECODE_STATE, "kv", {"k": k, "v": v}, reduce_fn=lambda _, new: new, init_fn=lambda: None)
                o = attention_over_cache(q, k, v, positions, previous["k"], previous["v"], previous["positions"],
                                         self.window)
            else:
                if previous is not None:  # a later prefill chunk: the earlier keys it can see, oldest first
                    k = jnp.concatenate([previous["k"].astype(k.dtype), k], axis=1)
                    v = jnp.concatenate([previous["v"].astype(v.dtype), v], axis=1)
                    seen = previous["k"].shape[1]
                    q = jnp.concatenate([jnp.zeros((batch, seen, h, hd), q.dtype), q], axis=1)
                self.sow(DECODE_STATE, "kv", {"k": k, "v": v}, reduce_fn=lambda _, new: new, init_fn=lambda: None)
                o = ops.sliding_window_attention(q, k, v, self.window, **options)[:, q.shape[1] - seq:]
        else:
            o = context_parallel.sliding_window_attention_on_mesh(q, k, v, self.window, **options)
        return Dense(cfg.d_model, ("heads", "embed"), dtype, self.out_scale, name="o_proj")(
            o.reshape(batch, seq, h * hd))
