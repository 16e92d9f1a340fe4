"""`perplexity`: how well a model predicts each position of long documents (paper §4.2, Table 3).

Three modes, labelled in the output:
- `streaming` (default): each row is scored chunk by chunk with the decoding state carried
  (evaluate/streaming.py): every token once, with its whole history, memory constant for Samba.
  The cumulative perplexity at an edge e is exactly the loss a full forward over the first e
  tokens would give (causality).
- `prefix`: the reference's `validate()`: the first L tokens of packed validation rows through one
  full forward, loss averaged over all positions, for each L of `lengths` (the paper's Table 3).
- `stride`: Press et al.'s sliding window for models that cannot stream past their memory: windows
  of `window` tokens advanced by `stride`, each scoring only the tokens it adds.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samba_jax.config import ConfigError, ModelConfig
from samba_jax.evaluate import results, streaming
from samba_jax.model.samba import SambaLM

PAPER_POINTS = (4096, 8192, 16384)  # Table 3's lengths


def bucket_edges(length: int, first: int = 64) -> list[int]:
    """Log-spaced position edges up to `length` (powers of two from `first`), plus the paper's points."""
    edges = {length}
    e = first
    while e < length:
        edges.add(e)
        e *= 2
    edges.update(p for p in PAPER_POINTS if p < length)
    return sorted(edges)


def summarize(nll: np.ndarray) -> dict[str, Any]:
    """nll: (rows, L) per-token losses -> mean NLL per bucket [previous edge, edge) of positions and
    the cumulative perplexity over the first `edge` positions, averaged over rows."""
    length = nll.shape[1]
    edges = bucket_edges(length)
    per_position = nll.astype(np.float64).mean(axis=0)
    cumulative = np.cumsum(per_position)
    buckets, lo = [], 0
    for e in edges:
        buckets.append({"from": lo, "to": e, "mean_nll": float(per_position[lo:e].mean())})
        lo = e
    cum = {str(e): math.exp(min(cumulative[e - 1] / e, 50.0)) for e in edges}
    return {"edges": edges, "buckets": buckets, "cumulative_perplexity": cum,
            "paper_points": {str(p): cum[str(p)] for p in PAPER_POINTS if str(p) in cum},
            "mean_nll": float(per_position.mean()), "perplexity": math.exp(min(float(per_position.mean()), 50.0))}


def check_fits(cfg: ModelConfig, params: Any, batch: int, length: int, chunk: int) -> dict[str, Any]:
    """Compiles (without running) one streaming chunk at this length and compares its memory with the
    device's; a model whose state grows with the length (full attention) that does not fit stops here
    with the longest length that would. Returns the estimate (bytes); checks nothing on a CPU."""
    state = jax.eval_shape(functools.partial(streaming.initial_state, cfg, batch, length))
    tok = jax.ShapeDtypeStruct((batch, min(chunk, length)), jnp.int32)
    compiled = jax.jit(functools.partial(streaming.score_chunk, cfg), donate_argnums=1).lower(
        params, state, tok, tok, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    mem = compiled.memory_analysis()
    need = None
    if mem is not None:
        need = int(mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                   - mem.alias_size_in_bytes)
    state_now = streaming.state_bytes(cfg, batch, length)
    out = {"estimated_bytes": need, "state_bytes": state_now}
    limit = results.device_memory_limit()
    if need is None or limit is None or need <= 0.95 * limit:
        return out
    per_token = (state_now - streaming.state_bytes(cfg, batch, 1)) / max(length - 1, 1)
    if per_token == 0:
        raise ConfigError(f"one chunk of {chunk} tokens needs ~{need / 2**30:.1f} GiB but the device has "
                          f"{limit / 2**30:.1f} GiB. Fix: a smaller --chunk.")
    fits = int((0.95 * limit - (need - state_now)) / per_token)
    raise ConfigError(
        f"streaming {length:,} tokens through this model ({','.join(cfg.pattern)}: its full-attention KV cache "
        f"grows with the context, {state_now / 2**30:.1f} GiB here) needs ~{need / 2**30:.1f} GiB but the device "
        f"has {limit / 2**30:.1f} GiB; the longest that fits is about {max(fits, 0):,} tokens. Fix: "
        f"--max_length={max(fits, 0)}, or --mode=stride (a sliding window; no state).")


def stream(cfg: ModelConfig, params: Any, rows: np.ndarray, chunk: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Streaming mode over rows (rows, L + 1): per-token NLL (rows, L) and the timing."""
    length = rows.shape[1] - 1
    total = rows.shape[0] * length
    bar = results.Progress(total, "tok", "perplexity (streaming)")
    marks = []

    def on_chunk(done):
        marks.append((time.perf_counter(), done))
        bar.update(done * rows.shape[0])

    start = time.perf_counter()
    nll = streaming.stream_nll(cfg, params, rows, chunk, on_chunk)
    wall = time.perf_counter() - start
    bar.close()
    timing = {"wall_seconds": wall, "tokens": total}
    if len(marks) > 1:  # rate after the first chunk (which includes compiling)
        (t0, d0), (t1, d1) = marks[0], marks[-1]
        timing["tokens_per_second"] = (d1 - d0) * rows.shape[0] / max(t1 - t0, 1e-9)
    else:
        timing["tokens_per_second"] = total / wall
    return nll, timing


def _window_nll(cfg: ModelConfig, params: Any, window_rows: jax.Array) -> jax.Array:
    return streaming.token_nll(SambaLM(cfg).apply({"params": params}, window_rows[:, :-1]), window_rows[:, 1:])


def stride(cfg: ModelConfig, params: Any, rows: np.ndarray, window: int, step: int
           ) -> tuple[np.ndarray, dict[str, Any]]:
    """Stride mode: per-token NLL (rows, L) where token t is scored in the window [e - window, e) that
    first covers it, e = window, window + step, ..., L (so each token sees window - step to window
    earlier tokens); every window has the same shape (one compile)."""
    length = rows.shape[1] - 1
    window = min(window, length)
    if not 1 <= step <= window:
        raise ConfigError(f"--stride={step} must be between 1 and the window ({window}).")
    run = jax.jit(functools.partial(_window_nll, cfg))
    out = np.empty((rows.shape[0], length), np.float32)
    ends = list(range(window, length, step)) + [length]
    bar = results.Progress(len(ends), "window", "perplexity (stride)")
    start, scored = time.perf_counter(), 0
    for i, e in enumerate(ends):
        nll = np.asarray(run(params, jnp.asarray(rows[:, e - window:e + 1])))
        out[:, scored:e] = nll[:, window - (e - scored):]
        scored = e
        bar.update(i + 1)
    bar.close()
    wall = time.perf_counter() - start
    return out, {"wall_seconds": wall, "tokens": rows.shape[0] * length,
                 "tokens_per_second": rows.shape[0] * length / wall, "window": window, "stride": step}


def prefix(cfg: ModelConfig, params: Any, source: str, tokenizer: Any, lengths: list[int], batch: int,
           batches: int, jsonl_field: str = "text") -> dict[str, Any]:
    """Prefix mode: for each L, mean loss over `batches` batches of packed validation rows cut to
    their first L + 1 tokens (the rows packed at max(lengths) + 1, unshuffled, as the trainer's eval)."""
    from samba_jax.data import pipeline
    from samba_jax.trainer import make_eval_step

    longest = max(lengths)
    data = pipeline.make_dataset(source, tokenizer, longest, batch, split="validation", shuffle=False, repeat=True,
                                 max_batches=batches, jsonl_field=jsonl_field, process_index=0, process_count=1)
    eval_step = make_eval_step(SambaLM(cfg))
    sums = {L: [0.0, 0.0] for L in lengths}
    bar = results.Progress(batches, "batch", "perplexity (prefix)")
    for i, b in enumerate(data):
        tokens = np.asarray(b["tokens"])
        for L in lengths:
            loss, count = eval_step(params, jnp.asarray(tokens[:, :L + 1]))
            sums[L][0] += float(loss)
            sums[L][1] += float(count)
        bar.update(i + 1)
    bar.close()
    out = {}
    for L, (loss, count) in sums.items():
        mean = loss / count
        out[str(L)] = {"mean_nll": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": int(count)}
    return out
