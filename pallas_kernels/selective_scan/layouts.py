"""The output contract every selective-scan kernel module implements (Triton and TPU alike)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def backward_out_shapes(u, delta, z, blocks: int, d_state: int, seq: int) -> list[jax.ShapeDtypeStruct]:
    """du, ddelta, dz (batch, seq, d); dB^T, dC^T partials (batch, d_blocks, d_state, seq) f32;
    dA^T (batch, d_state, d), dD and dbias (batch, 1, d), dh0 (batch, d_state, d), all f32.

    `u`'s shape gives (batch, seq', d); `seq` is the (possibly padded) length of the B/C partials.
    """
    batch, _, width = u.shape
    state = jax.ShapeDtypeStruct((batch, d_state, width), F32)
    partial_col = jax.ShapeDtypeStruct((batch, blocks, d_state, seq), F32)
    vec = jax.ShapeDtypeStruct((batch, 1, width), F32)
    return [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(u.shape, delta.dtype),
            jax.ShapeDtypeStruct(u.shape, z.dtype), partial_col, partial_col, state, vec, vec, state]
