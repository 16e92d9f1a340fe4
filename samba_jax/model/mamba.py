"""The Mamba-1 mixer (Gu & Dao 2023) exactly as mamba_ssm's `Mamba` that the Samba reference uses.

x -> in_proj -> (x, z); x -> causal depthwise conv (width 4, bias) -> SiLU = u;
u -> x_proj -> (dt_low, B, C); delta = dt_proj(dt_low) (its bias applied inside the scan);
y = selective_scan(u, delta, A=-exp(A_log), B, C, D, z, delta_bias, softplus); out = out_proj(y).
Shapes: x (batch, seq, d_model); u, z, delta (batch, seq, d_inner); B, C (batch, seq, d_state).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from samba_jax import context_parallel, ops
from samba_jax.config import ModelConfig
from samba_jax.model.layers import Dense, uniform_init


def dt_bias_init(cfg: ModelConfig):
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] floored at dt_init_floor (mamba_ssm's init)."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        # softplus^-1(dt) = dt + log(1 - exp(-dt)); expm1 keeps it accurate for small dt.
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def a_log_init(key, shape, dtype=jnp.float32):
    """S4D-real: A_log[c, n] = log(n + 1) for every channel c. shape: (d_inner, d_state)."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Causal depthwise conv1d, PyTorch tap order (kernel[-1] multiplies the current step).

    x: (batch, seq, channels); kernel: (width, channels); bias: (channels,). Returns float32.
    """
    width = kernel.shape[0]
    x = x.astype(jnp.float32)
    padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
    seq = x.shape[1]
    # A width-4 conv is four shifted multiply-adds; XLA fuses them into one pass.
    out = sum(padded[:, k:k + seq] * kernel[k] for k in range(width))
    return out + bias


# Flax collection that a prefill marks mutable to receive each layer's decoding state (generate.py).
DECODE_STATE = "decode_state"


class MambaMixer(nn.Module):
    """Mamba-1 mixer. x: (batch, seq, d_model) float32 -> (batch, seq, d_model) in compute dtype."""

    cfg: ModelConfig
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        di, n, rank = cfg.d_inner, cfg.ssm_state, cfg.resolved_dt_rank

        xz = Dense(2 * di, ("embed", "ssm_inner"), dtype, name="in_proj")(x)
        x_in, z = jnp.split(xz, 2, axis=-1)

        # PyTorch Conv1d default init: fan_in = in_channels/groups * width = width, for weight and bias.
        conv_bound = 1.0 / math.sqrt(cfg.ssm_conv)
        conv_kernel = self.param("conv_kernel", nn.with_logical_partitioning(
            uniform_init(conv_bound), ("conv_width", "ssm_inner")), (cfg.ssm_conv, di), jnp.float32)
        conv_bias = self.param("conv_bias", nn.with_logical_partitioning(
            uniform_init(conv_bound), ("ssm_inner",)), (di,), jnp.float32)
        tail = cfg.ssm_conv - 1  # conv inputs a chunk needs from before it
        previous = self.get_variable(DECODE_STATE, "previous") if self.has_variable(DECODE_STATE, "previous") else None
        if previous is not None:  # a later prefill chunk: the conv sees the previous chunk's last inputs
            x_in = jnp.concatenate([previous["conv"].astype(x_in.dtype), x_in], axis=1)
        if previous is None:
            conv_out = context_parallel.causal_conv_on_mesh(x_in, conv_kernel, conv_bias, causal_depthwise_conv)
        else:
            conv_out = causal_depthwise_conv(x_in, conv_kernel, conv_bias)
        u = nn.silu(conv_out if previous is None else conv_out[:, tail:]).astype(dtype)

        x_dbl = Dense(rank + 2 * n, ("ssm_inner", "ssm_proj"), dtype, name="x_proj")(u)
        dt_low, b, c = jnp.split(x_dbl, [rank, rank + n], axis=-1)
        delta = Dense(di, ("ssm_rank", "ssm_inner"), dtype, name="dt_proj")(dt_low)
        dt_bias = self.param("dt_bias", nn.with_logical_partitioning(dt_bias_init(cfg), ("ssm_inner",)),
                             (di,), jnp.float32)
        a_log = self.param("A_log", nn.with_logical_partitioning(a_log_init, ("ssm_inner", "ssm_state")),
                           (di, n), jnp.float32)
        d_skip = self.param("D", nn.with_logical_partitioning(nn.initializers.ones, ("ssm_inner",)),
                            (di,), jnp.float32)

        scan_args = (u, delta, -jnp.exp(a_log), b, c)
        scan_kwargs = dict(D=d_skip, z=z, delta_bias=dt_bias, delta_softplus=True,
                           implementation=cfg.scan_implementation or None, chunk_size=cfg.scan_chunk,
                           sequence_splits=cfg.scan_sequence_splits or None)
        if self.is_mutable_collection(DECODE_STATE) and not self.is_initializing():  # prefill for generation
            initial = None if previous is None else previous["h"]
            y, final = ops.selective_scan(*scan_args, **scan_kwargs, initial_state=initial, return_final_state=True)
            # The conv's inputs from before the next token, oldest first (zeros before the sequence).
            conv = jnp.pad(x_in.astype(jnp.float32), ((0, 0), (max(0, tail - x_in.shape[1]), 0), (0, 0)))
            self.sow(DECODE_STATE, "mamba", {"conv": conv[:, conv.shape[1] - tail:], "h": final},
                     reduce_fn=lambda _, new: new, init_fn=lambda: None)
        else:
            y = context_parallel.selective_scan_on_mesh(*scan_args, **scan_kwargs)
        return Dense(cfg.d_model, ("ssm_inner", "embed"), dtype, self.out_scale, name="out_proj")(y)
