"""Next-token cross-entropy without materialising the full (batch, seq, vocab) logits.

At long context the head dominates memory: samba_1b at one 128K-token sequence has 16.8 GB of
float32 logits, and the softmax's backward holds as much again. `chunked_cross_entropy` splits the
positions into `chunks` groups and, for each in turn (lax.scan), computes the group's logits,
log-softmax and loss; jax.checkpoint recomputes the group's logits in the backward instead of
saving them. Peak head memory falls by `chunks`x for one extra head matmul (2*d_model*vocab
FLOPs/token, under 2% of samba_1b's training FLOPs).

Group j holds positions j, j + chunks, j + 2*chunks, ... (a strided split): the sum is the same as
for contiguous pieces, and each group keeps the sequence's sharding over the `context` mesh axis,
so context-parallel shards each compute their own positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Auto mode chunks once the float32 logits of the whole batch would exceed this many bytes.
AUTO_LOGIT_BYTES = 4 * 2**30


def auto_chunks(batch: int, seq: int, vocab: int, limit_bytes: int = AUTO_LOGIT_BYTES) -> int:
    """Fewest chunks (a divisor of seq) that keep one chunk's float32 logits under `limit_bytes`."""
    need = -(-batch * seq * vocab * 4 // limit_bytes)
    for chunks in range(max(need, 1), seq + 1):
        if seq % chunks == 0:
            return chunks
    return seq


def chunked_cross_entropy(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunks: int,
                          dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Summed cross-entropy of logits = hidden @ head against targets, `chunks` groups at a time.

    hidden: (batch, seq, d_model) float32; head: (d_model, vocab) float32, cast to `dtype` for
    the matmul (as the model's head does); targets: (batch, seq) int. seq % chunks == 0.
    Returns a float32 scalar.
    """
    batch, seq, d_model = hidden.shape
    if seq % chunks:
        raise ValueError(f"chunked_cross_entropy: chunks={chunks} must divide the sequence length {seq}")
    w = head.astype(dtype)

    def group_loss(h, t):  # h: (batch, seq // chunks, d_model); t: (batch, seq // chunks)
        logits = jnp.dot(h.astype(dtype), w).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t).sum()

    if chunks == 1:
        return group_loss(hidden, targets)
    # (batch, seq, d) -> (chunks, batch, seq // chunks, d): position i * chunks + j goes to group j.
    hs = jnp.moveaxis(hidden.reshape(batch, seq // chunks, chunks, d_model), 2, 0)
    ts = jnp.moveaxis(targets.reshape(batch, seq // chunks, chunks), 2, 0)
    step = jax.checkpoint(group_loss)

    def body(total, xs):
        return total + step(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ts))
    return total
