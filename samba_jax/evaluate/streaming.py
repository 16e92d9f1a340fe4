"""Per-token negative log-likelihood of long sequences, fed chunk by chunk with the decoding state.

Each chunk runs through the parallel model (the training kernels) with the state the earlier chunks
left: per Mamba sublayer the scan state and the conv's last inputs, per attention sublayer a KV
buffer whose slots carry the absolute position they hold (`ops/cache_attention.py`): a ring of
`window` slots for SWA, the whole context for full attention. So every token is scored exactly once,
with its whole history, and for Samba (Mamba + SWA) the memory does not grow with the length. All
chunks share one compiled program: the state's shapes never change, the chunk's start position is
an argument, not a constant, and a ragged last chunk is padded.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from samba_jax.config import ModelConfig
from samba_jax.model.mamba import DECODE_STATE
from samba_jax.model.samba import SambaLM
from samba_jax.ops.cache_attention import write_chunk

F32 = jnp.float32


def cache_slots(cfg: ModelConfig, kind: str, length: int) -> int:
    """KV slots an attention sublayer keeps to score `length` tokens: the window for SWA, all for full."""
    return min(cfg.window, length) if kind == "swa" else length


def initial_state(cfg: ModelConfig, batch: int, length: int) -> dict[str, Any]:
    """The state before the first token: zero scan states and conv inputs (the model's own zero
    padding), empty KV buffers. Leaves are stacked over the scanned repeats (leading axis)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    r = cfg.num_repeats
    state = {}
    for i, kind in enumerate(cfg.pattern):
        if kind == "mamba":
            state[f"mamba_{i}"] = {"conv": jnp.zeros((r, batch, cfg.ssm_conv - 1, cfg.d_inner), F32),
                                   "h": jnp.zeros((r, batch, cfg.d_inner, cfg.ssm_state), F32)}
        elif kind in ("swa", "attn"):
            slots = cache_slots(cfg, kind, length)
            shape = (r, batch, slots, cfg.num_kv_heads, cfg.head_dim)
            state[f"{kind}_{i}"] = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),  # two buffers:
                                    "positions": jnp.full((r, batch, slots), -1, jnp.int32)}  # both donated
    return state


def state_bytes(cfg: ModelConfig, batch: int, length: int) -> int:
    """Bytes of `initial_state` (what the state costs whatever has been read), without allocating it."""
    shapes = jax.eval_shape(functools.partial(initial_state, cfg, batch, length))
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(shapes))


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits (..., vocab) float32, targets (...) int32 -> -log p(target), (...) float32."""
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def score_chunk(cfg: ModelConfig, params: Any, state: dict, tokens: jax.Array, targets: jax.Array,
                start: jax.Array) -> tuple[jax.Array, dict]:
    """tokens, targets: (batch, chunk) int32 (targets: the next tokens); start: () int32, the position
    of tokens[:, 0]. Returns (nll (batch, chunk) float32, the state after the chunk)."""
    batch, chunk = tokens.shape
    positions = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
    previous = {name: {"previous": st} for name, st in state.items()}
    logits, out = SambaLM(cfg).apply({"params": params, DECODE_STATE: {"blocks": previous}}, tokens, positions,
                                     mutable=[DECODE_STATE])
    nll = token_nll(logits, targets)
    sown = out[DECODE_STATE]["blocks"]
    new = {}
    for name, st in state.items():
        if name.startswith("mamba"):
            new[name] = sown[name]["mamba"]
        else:  # this chunk's keys and values into the buffer, per repeat
            kv = sown[name]["kv"]  # (repeats, batch, chunk, kv_heads, head_dim)
            write = jax.vmap(write_chunk, in_axes=(0, 0, 0, None))
            k, pos = write(st["k"], st["positions"], kv["k"], positions)
            v, _ = write(st["v"], st["positions"], kv["v"], positions)
            new[name] = {"k": k, "v": v, "positions": pos}
    return nll, new


def stream_nll(cfg: ModelConfig, params: Any, rows: np.ndarray, chunk: int = 4096,
               on_chunk: Callable[[int], None] | None = None) -> np.ndarray:
    """Per-token NLL of rows (batch, L + 1) int32 (token t + 1 is the target of token t), scored in
    chunks of `chunk` tokens that carry the state. Returns (batch, L) float32 on the host.
    on_chunk(tokens_done) is called after each chunk (progress)."""
    rows = np.asarray(rows, np.int32)
    batch, length = rows.shape[0], rows.shape[1] - 1
    if length < 1:
        raise ValueError(f"rows need at least 2 tokens (one scored), got shape {rows.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    chunk = min(chunk, length)
    step = jax.jit(functools.partial(score_chunk, cfg), donate_argnums=1)
    state = initial_state(cfg, batch, length)
    out = np.empty((batch, length), np.float32)
    # A ragged last chunk is padded to the chunk's shape (one compile for all): the padding comes after
    # every real token, so causality keeps it out of their losses; only the final state sees it.
    padded = np.zeros((batch, -(-length // chunk) * chunk + 1), np.int32)
    padded[:, :length + 1] = rows
    pending = None  # the previous chunk's NLL, fetched while the next chunk runs
    for start in range(0, length, chunk):
        nll, state = step(params, state, jnp.asarray(padded[:, start:start + chunk]),
                          jnp.asarray(padded[:, start + 1:start + chunk + 1]), jnp.asarray(start, jnp.int32))
        if pending is not None:
            _take(out, pending, on_chunk)
        pending = (start, min(start + chunk, length), nll)
    _take(out, pending, on_chunk)
    return out


def _take(out: np.ndarray, pending: tuple, on_chunk: Callable[[int], None] | None) -> None:
    start, end, nll = pending
    out[:, start:end] = np.asarray(nll)[:, :end - start]
    if on_chunk:
        on_chunk(end)
