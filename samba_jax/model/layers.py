"""Small building blocks: initialisers, Dense, RMSNorm, SwiGLU MLP, rotary embeddings.

Initialisation follows the PyTorch reference (microsoft/Samba `GPT._init_weights` with
`mamba_init=True`): linears keep PyTorch's default U(±1/sqrt(fan_in)); the residual output
projections are further divided by sqrt(num residual sublayers); the embedding is N(0, 0.02).
Parameters are float32; matmuls run in the configured compute dtype; norms run in float32.
Every parameter carries logical axis names (MaxText style) for the sharding rules.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def torch_linear_init(scale: float = 1.0) -> Initializer:
    """U(±scale/sqrt(fan_in)) for a (fan_in, fan_out) kernel: PyTorch's nn.Linear default times `scale`."""
    # variance_scaling(s, fan_in, uniform) draws U(±sqrt(3 s / fan_in)); s = scale^2 / 3 gives ±scale/sqrt(fan_in).
    return nn.initializers.variance_scaling(scale**2 / 3.0, "fan_in", "uniform")


def uniform_init(bound: float) -> Initializer:
    """U(±bound), any shape."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Dense(nn.Module):
    """y = x @ W (no bias), W float32 `(in, out)` cast to `dtype` for the matmul.

    Attributes:
      features: output width.
      axes: logical names of W's two axes, e.g. ("embed", "mlp").
      dtype: compute dtype of the matmul (its output dtype too).
      init_scale: multiplies PyTorch's default bound (1/sqrt(num_layers) for residual outputs).
    """

    features: int
    axes: tuple[str, str]
    dtype: jnp.dtype = jnp.float32
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(torch_linear_init(self.init_scale), self.axes),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32; w starts at 1. x: (..., d) -> float32."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.float32)
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale


class SwiGLU(nn.Module):
    """out = w3(silu(w1 x) * w2 x): w1 gate, w2 up, w3 down (xformers' SwiGLU as in the reference).

    x: (batch, seq, d_model) -> (batch, seq, d_model) in `dtype`.
    """

    hidden: int
    dtype: jnp.dtype = jnp.float32
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        gate = Dense(self.hidden, ("embed", "mlp"), self.dtype, name="w1")(x)
        up = Dense(self.hidden, ("embed", "mlp"), self.dtype, name="w2")(x)
        return Dense(d, ("mlp", "embed"), self.dtype, self.out_scale, name="w3")(nn.silu(gate) * up)


class Embedding(nn.Module):
    """Token embedding N(0, 0.02), float32; `attend` gives tied-head logits."""

    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.vocab_size, self.features),
            jnp.float32,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: (batch, seq) int -> (batch, seq, features) float32."""
        return jnp.take(self.embedding, tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: (batch, seq, features) -> logits (batch, seq, vocab) in `dtype`."""
        return jnp.dot(x.astype(self.dtype), self.embedding.T.astype(self.dtype))


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """GPT-NeoX (half-split) rotary embedding over the full head dimension.

    x: (batch, seq, heads, head_dim); positions: (batch, seq) absolute token positions.
    Angles are computed in float32 (position * theta), as in the reference.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (batch, seq, half)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
