"""The Samba language model: embedding -> scanned repeats of the block pattern -> RMSNorm -> tied head.

Each entry of `cfg.pattern` is one pre-norm residual sublayer, `x += layer(norm(x))`, with the
residual stream in float32. Samba is ("mamba", "mlp", "swa", "mlp") repeated: the reference's
blocks 2i (Mamba + MLP) and 2i+1 (SWA + MLP). One repeat of the pattern is a `PatternBlock`;
`nn.scan` runs it `num_repeats` times over stacked parameters, so compile time does not grow with
depth (MaxText's "scannable block"). Parameters get a leading "layers" axis of size num_repeats.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from samba_jax.config import ModelConfig
from samba_jax.model.attention import Attention
from samba_jax.model.layers import Dense, Embedding, RMSNorm, SwiGLU
from samba_jax.model.mamba import DECODE_STATE, MambaMixer
from samba_jax.sharding import constrain

REMAT_POLICIES = {
    "block": None,  # save only the block's input, recompute everything else
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The residual stream between blocks: (batch, seq, d_model), split as the rules say (sharding.py).
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed")


class PatternBlock(nn.Module):
    """One repeat of the pattern. x: (batch, seq, d_model) float32; positions: (batch, seq)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, None]:
        cfg = self.cfg
        # Reference init: residual output projections divided by sqrt(number of residual sublayers).
        out_scale = 1.0 / math.sqrt(cfg.num_layers)
        dtype = jnp.dtype(cfg.compute_dtype)
        x = constrain(x, ACTIVATION_AXES)
        for i, kind in enumerate(cfg.pattern):
            h = RMSNorm(cfg.norm_eps, name=f"norm_{i}")(x)
            if kind == "mamba":
                h = MambaMixer(cfg, out_scale, name=f"mamba_{i}")(h)
            elif kind == "mlp":
                h = SwiGLU(cfg.mlp_hidden, dtype, out_scale, name=f"mlp_{i}")(h)
            else:
                window = cfg.window if kind == "swa" else None
                h = Attention(cfg, window, out_scale, name=f"{kind}_{i}")(h, positions)
            x = x + h.astype(jnp.float32)
        return constrain(x, ACTIVATION_AXES), None


class SambaLM(nn.Module):
    """tokens (batch, seq) int32 -> logits (batch, seq, vocab) float32.

    return_hidden: give the final-normed hidden states (batch, seq, d_model) float32 instead of the
    logits, for a loss that applies the head itself (`head_matrix`, model/chunked_loss.py).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 return_hidden: bool = False) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        embed = Embedding(cfg.vocab_size, cfg.d_model, dtype, name="embed")
        x = embed(tokens)

        block = PatternBlock
        if cfg.remat != "none":
            block = nn.remat(block, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        blocks = nn.scan(
            block,
            variable_axes={"params": 0, DECODE_STATE: 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=cfg.num_repeats,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = blocks(cfg, name="blocks")(x, positions)

        x = RMSNorm(cfg.norm_eps, name="final_norm")(x)
        if return_hidden:
            return x
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), dtype, name="lm_head")(x)
        return logits.astype(jnp.float32)


def head_matrix(cfg: ModelConfig, params) -> jax.Array:
    """The output head as a (d_model, vocab) float32 matrix: the tied embedding's transpose or lm_head."""
    return params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]["kernel"]


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Boxed (logically partitioned) float32 parameters. Use `nn.unbox` for plain arrays."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return SambaLM(cfg).init(rng, tokens)["params"]


def abstract_params(cfg: ModelConfig, seq_len: int = 8):
    """Shapes and logical axes of the parameters without allocating them (jax.eval_shape)."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), seq_len))
