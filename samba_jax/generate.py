"""Generation: a parallel prefill that returns the decoding state, then one jitted step per token.

The state per scanned repeat is, for each Mamba sublayer, the last d_conv - 1 conv inputs and the
(d_inner, d_state) scan state, and for each attention sublayer a ring buffer of keys and values
(the last `window` for SWA; the whole context for full `attn` layers). So for Samba the memory is
constant in the number of tokens generated and in the prompt length. The prefill is the training
model itself (scan kernel, attention op) with the `decode_state` collection mutable; the step
re-applies the same Flax layers to one token (`Dense`, `RMSNorm`, `SwiGLU`), so the math is shared.
Prompts are prefilled in chunks that carry the state (so a prompt of any length needs the memory
of one chunk). Prompts of different lengths: the shortest is prefilled for all rows at once, the
rest of each longer prompt is fed through decoding steps (its tokens forced instead of sampled).

CLI: `python -m samba_jax.generate --checkpoint=WORKDIR --prompt="def fib(n):" --max_new_tokens=64`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from samba_jax.config import ModelConfig
from samba_jax.model.layers import Dense, RMSNorm, SwiGLU, apply_rotary
from samba_jax.model.mamba import DECODE_STATE
from samba_jax.model.samba import SambaLM
from samba_jax.ops.attention import sliding_window_attention_decode

F32 = jnp.float32


def cache_length(cfg: ModelConfig, kind: str, max_len: int) -> int:
    """Ring-buffer slots of an attention sublayer: the window for "swa", the whole context for "attn"."""
    return min(cfg.window, max_len) if kind == "swa" else max_len


def _ring_positions(end: jax.Array, slots: int, batch: int) -> jax.Array:
    """(batch, slots): the position slot s holds after positions < end were written (-1: none yet)."""
    s = jnp.arange(slots)
    pos = (end - 1) - ((end - 1 - s) % slots)
    return jnp.broadcast_to(jnp.where(pos >= 0, pos, -1), (batch, slots)).astype(jnp.int32)


def _ring(kv: jax.Array, first: jax.Array, end: jax.Array, slots: int) -> jax.Array:
    """Keys of positions first .. end - 1, (repeats, batch, end - first, ...) -> the ring buffer
    (repeats, batch, slots, ...) where slot s holds the latest position p < end with p % slots == s."""
    pos = _ring_positions(end, slots, 1)[0]
    taken = jnp.take(kv, jnp.clip(pos - first, 0, kv.shape[2] - 1), axis=2)
    return jnp.where((pos >= 0).reshape((1, 1, slots) + (1,) * (kv.ndim - 3)), taken, 0)


def prefill(cfg: ModelConfig, params: Any, tokens: jax.Array, max_len: int, state: dict | None = None,
            seen: dict[str, int] | None = None) -> tuple[jax.Array, dict]:
    """Runs a prompt chunk (batch, length) through the parallel model.

    Without `state` the chunk starts the sequence; with the state of earlier chunks it continues
    them (chunked prefill: memory bounded by the chunk, whatever the prompt's length). `seen`
    (static) gives, per attention kind, how many earlier keys the chunk can see:
    min(tokens so far, cache slots) (see `prefill_seen`). Returns the last position's logits (batch,
    vocab) float32 and the decoding state for the positions after the chunk, up to max_len - 1.
    """
    batch, length = tokens.shape
    start = jnp.zeros((), jnp.int32) if state is None else state["position"][0]
    variables = {"params": params}
    if state is not None:
        previous = {}
        for name, repeats in state["layers"].items():
            st = stack_repeats(repeats)  # the scanned model takes the repeats stacked
            if name.startswith("mamba"):
                previous[name] = {"previous": st}
            else:
                slots, n = st["k"].shape[2], seen[name.split("_")[0]]
                order = (jnp.arange(n) + start - n) % slots  # the last n positions, oldest first
                previous[name] = {"previous": {"k": jnp.take(st["k"], order, axis=2),
                                               "v": jnp.take(st["v"], order, axis=2)}}
        variables[DECODE_STATE] = {"blocks": previous}
    positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), tokens.shape)
    logits, out = SambaLM(cfg).apply(variables, tokens, positions, mutable=[DECODE_STATE])
    sown = out[DECODE_STATE]["blocks"]
    end = start + length
    layers = {}
    for i, kind in enumerate(cfg.pattern):
        if kind == "mamba":
            layers[f"mamba_{i}"] = sown[f"mamba_{i}"]["mamba"]
        elif kind in ("swa", "attn"):
            kv = sown[f"{kind}_{i}"]["kv"]  # positions end - kv_len .. end - 1
            slots = cache_length(cfg, kind, max_len)
            layers[f"{kind}_{i}"] = {n: _ring(kv[n], end - kv[n].shape[2], end, slots) for n in ("k", "v")}
    positions = {kind: _ring_positions(end, cache_length(cfg, kind, max_len), batch)
                 for kind in ("swa", "attn") if kind in cfg.pattern}
    layers = {name: unstack_repeats(st, cfg.num_repeats) for name, st in layers.items()}
    state = {"layers": layers, "slot_positions": positions, "position": jnp.full((batch,), end, jnp.int32)}
    return logits[:, -1], state


def unstack_repeats(tree: Any, repeats: int) -> tuple:
    """A pytree of arrays stacked over the scanned repeats (leading axis) -> a tuple of `repeats` pytrees.

    The decoding step keeps its caches and weights per repeat: each cache is then its own buffer,
    updated in place one slot per token, and each weight is read without slicing a stacked array.
    """
    return tuple(jax.tree.map(lambda a, j=j: a[j], tree) for j in range(repeats))


def stack_repeats(per_repeat: Sequence[Any]) -> Any:
    """The inverse of `unstack_repeats`."""
    return jax.tree.map(lambda *a: jnp.stack(a), *per_repeat)


def decode_params(cfg: ModelConfig, params: Any) -> Any:
    """The parameters as the decoding step reads them fastest, prepared once (optional: `decode_step`
    also takes the training layout, and then redoes this in every step).

    The scanned blocks are split per repeat, and the matmul weights (every Dense `kernel`, and the
    tied embedding as the output head) are cast to the compute dtype: the matmuls cast them anyway,
    but a step that starts from float32 weights reads twice the bytes and writes a copy.
    """
    if isinstance(params["blocks"], tuple):
        return params
    dtype = jnp.dtype(cfg.compute_dtype)

    def to_compute_dtype(path, a):
        return a.astype(dtype) if getattr(path[-1], "key", None) == "kernel" else a

    out = jax.tree_util.tree_map_with_path(to_compute_dtype, {k: v for k, v in params.items() if k != "embed"})
    out["embed"] = params["embed"]  # looked up in float32, as in the parallel model
    out["blocks"] = unstack_repeats(out["blocks"], cfg.num_repeats)
    if cfg.tie_embeddings:
        out["tied_head"] = params["embed"]["embedding"].astype(dtype)
    return out


def prefill_seen(cfg: ModelConfig, start: int, max_len: int) -> dict[str, int]:
    """Earlier keys visible to a chunk starting at `start`, per attention kind (for `prefill`)."""
    return {kind: min(start, cache_length(cfg, kind, max_len)) for kind in ("swa", "attn")}


def _mamba_step(cfg: ModelConfig, p: Any, x: jax.Array, st: dict) -> tuple[jax.Array, dict]:
    """One token through the Mamba mixer. x: (batch, d_model) float32 (normed)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    di, n, rank = cfg.d_inner, cfg.ssm_state, cfg.resolved_dt_rank
    xz = Dense(2 * di, ("embed", "ssm_inner"), dtype).apply({"params": p["in_proj"]}, x)
    x_in, z = jnp.split(xz, 2, axis=-1)
    window = jnp.concatenate([st["conv"], x_in.astype(F32)[:, None]], axis=1)  # (batch, d_conv, d_inner)
    u = jax.nn.silu(jnp.sum(window * p["conv_kernel"], axis=1) + p["conv_bias"]).astype(dtype)
    x_dbl = Dense(rank + 2 * n, ("ssm_inner", "ssm_proj"), dtype).apply({"params": p["x_proj"]}, u)
    dt_low, b, c = jnp.split(x_dbl, [rank, rank + n], axis=-1)
    delta = Dense(di, ("ssm_rank", "ssm_inner"), dtype).apply({"params": p["dt_proj"]}, dt_low)
    dt = jax.nn.softplus(delta.astype(F32) + p["dt_bias"])  # (batch, d_inner)
    a = -jnp.exp(p["A_log"])  # (d_inner, d_state)
    h = jnp.exp(dt[..., None] * a) * st["h"] + (dt * u.astype(F32))[..., None] * b.astype(F32)[:, None, :]
    y = jnp.sum(h * c.astype(F32)[:, None, :], axis=-1) + p["D"] * u.astype(F32)
    y = (y * jax.nn.silu(z.astype(F32))).astype(dtype)
    out = Dense(cfg.d_model, ("ssm_inner", "embed"), dtype).apply({"params": p["out_proj"]}, y)
    return out, {"conv": window[:, 1:], "h": h}


def _attention_step(cfg: ModelConfig, p: Any, x: jax.Array, st: dict, slot_positions: jax.Array,
                    position: jax.Array, window: int | None) -> tuple[jax.Array, dict]:
    """One token through GQA attention with a ring-buffer cache. x: (batch, d_model) float32."""
    dtype = jnp.dtype(cfg.compute_dtype)
    batch = x.shape[0]
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = Dense(h * hd, ("embed", "heads"), dtype).apply({"params": p["q_proj"]}, x).reshape(batch, 1, h, hd)
    k = Dense(kv * hd, ("embed", "kv_heads"), dtype).apply({"params": p["k_proj"]}, x).reshape(batch, 1, kv, hd)
    v = Dense(kv * hd, ("embed", "kv_heads"), dtype).apply({"params": p["v_proj"]}, x).reshape(batch, 1, kv, hd)
    q = apply_rotary(q, position[:, None], cfg.rope_base)
    k = apply_rotary(k, position[:, None], cfg.rope_base)
    rows, slot = jnp.arange(batch), position % st["k"].shape[1]
    cache = {"k": st["k"].at[rows, slot].set(k[:, 0].astype(st["k"].dtype)),
             "v": st["v"].at[rows, slot].set(v[:, 0].astype(st["v"].dtype))}
    o = sliding_window_attention_decode(q[:, 0], cache["k"], cache["v"], slot_positions, position, window,
                                        implementation=cfg.decode_attention_implementation or None)
    out = Dense(cfg.d_model, ("heads", "embed"), dtype).apply({"params": p["o_proj"]}, o.reshape(batch, h * hd))
    return out, cache


def decode_step(cfg: ModelConfig, params: Any, state: dict, token: jax.Array) -> tuple[jax.Array, dict]:
    """token (batch,) int32 at state["position"] -> (logits (batch, vocab) float32, next state).

    The repeats are unrolled (not scanned), so every cache is updated in place when the state is
    donated, and a step reads each weight and each cache entry once; `decode_params` prepares the
    weights per repeat ahead of the loop.
    """
    position = state["position"]
    slot_positions = {kind: pos.at[jnp.arange(pos.shape[0]), position % pos.shape[1]].set(position)
                      for kind, pos in state["slot_positions"].items()}
    x = jnp.take(params["embed"]["embedding"], token, axis=0)  # (batch, d_model) float32
    params = decode_params(cfg, params)
    blocks = params["blocks"]
    layers = {name: [] for name in state["layers"]}
    for repeat, p in enumerate(blocks):
        for i, kind in enumerate(cfg.pattern):
            h = RMSNorm(cfg.norm_eps).apply({"params": p[f"norm_{i}"]}, x)
            name = f"{kind}_{i}"
            if kind == "mamba":
                h, new = _mamba_step(cfg, p[name], h, state["layers"][name][repeat])
                layers[name].append(new)
            elif kind == "mlp":
                h = SwiGLU(cfg.mlp_hidden, jnp.dtype(cfg.compute_dtype)).apply({"params": p[name]}, h)
            else:
                window = cfg.window if kind == "swa" else None
                h, new = _attention_step(cfg, p[name], h, state["layers"][name][repeat], slot_positions[kind],
                                         position, window)
                layers[name].append(new)
            x = x + h.astype(F32)
    layers = {name: tuple(per_repeat) for name, per_repeat in layers.items()}
    x = RMSNorm(cfg.norm_eps).apply({"params": params["final_norm"]}, x)
    dtype = jnp.dtype(cfg.compute_dtype)
    if cfg.tie_embeddings:
        logits = jnp.dot(x.astype(dtype), params["tied_head"].T)
    else:
        logits = Dense(cfg.vocab_size, ("embed", "vocab"), dtype).apply({"params": params["lm_head"]}, x)
    return logits.astype(F32), {"layers": layers, "slot_positions": slot_positions, "position": position + 1}


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """Next tokens (batch,) from logits (batch, vocab): greedy at temperature 0, else sampled from the
    tempered distribution restricted to the top_k tokens (0: all) and the top_p probability mass."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jnp.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the top token always stays
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: Sequence[int] = (), on_token: Callable[[int, int], None] | None = None,
             prefill_chunk: int = 4096) -> list[list[int]]:
    """Continues each prompt (token ids, at least one each) by up to max_new_tokens tokens.

    The prompts are prefilled `prefill_chunk` tokens at a time (0: all at once), so a prompt of any
    length fits in the memory of one chunk.

    Generation of a row ends at a token in stop_tokens (included in its output). on_token(row,
    token) is called for each generated token as it is produced (for streaming). Returns the new
    tokens of each row.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's EOS as a start token)")
    lengths = np.array([len(p) for p in prompts])
    first, total = int(lengths.min()), int(lengths.max()) + max_new_tokens
    padded = np.zeros((len(prompts), total), np.int32)
    for row, p in enumerate(prompts):
        padded[row, :len(p)] = p
    logits, state = prefill_chunks(cfg, params, jnp.asarray(padded[:, :first]), total, prefill_chunk)
    params = decode_params(cfg, params)
    step = jax.jit(functools.partial(_step_and_sample, cfg, temperature=temperature, top_k=top_k, top_p=top_p),
                   donate_argnums=1)
    key = jax.random.key(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    stops = set(int(t) for t in stop_tokens)
    for position in range(first, total):
        key, sub = jax.random.split(key)
        forced = jnp.asarray(padded[:, position]), jnp.asarray(position < lengths)
        token, logits, state = step(params, state, logits, sub, *forced)
        token = np.asarray(token)
        for row in np.flatnonzero((position >= lengths) & ~done):
            if len(outputs[row]) < max_new_tokens:
                outputs[row].append(int(token[row]))
                if on_token:
                    on_token(int(row), int(token[row]))
                done[row] = int(token[row]) in stops or len(outputs[row]) == max_new_tokens
        if done.all():
            break
    return outputs


def prefill_chunks(cfg: ModelConfig, params: Any, tokens: jax.Array, max_len: int, chunk: int = 4096
                   ) -> tuple[jax.Array, dict]:
    """`prefill` of (batch, length) tokens in chunks of `chunk` (0: one piece); one compile per
    distinct (chunk length, visible earlier keys)."""
    length = tokens.shape[1]
    chunk = chunk or length
    run = jax.jit(functools.partial(prefill, cfg, max_len=max_len), static_argnames=("seen",))
    logits, state = run(params, tokens[:, :chunk])
    for start in range(chunk, length, chunk):
        seen = tuple(sorted(prefill_seen(cfg, start, max_len).items()))
        logits, state = run(params, tokens[:, start:start + chunk], state=state, seen=_Seen(seen))
    return logits, state


class _Seen(dict):
    """A hashable dict, so jit can take it as a static argument."""

    def __init__(self, items):
        super().__init__(items)

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def _step_and_sample(cfg, params, state, logits, key, forced_token, is_forced, *, temperature, top_k, top_p):
    token = jnp.where(is_forced, forced_token, sample(logits, key, temperature, top_k, top_p))
    logits, state = decode_step(cfg, params, state, token)
    return token, logits, state


def main(argv: Sequence[str]) -> None:  # pragma: no cover - exercised through the CLI test
    import sys

    from absl import flags, logging

    from samba_jax import export
    from samba_jax.config import ConfigError
    from samba_jax.data import pipeline

    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    f = flags.FLAGS
    try:
        config, cfg, params, step = export.restore_params(f.checkpoint, f.step)
    except ConfigError as e:
        print(f"ERROR ({type(e).__name__}): {e}", file=sys.stderr)
        sys.exit(2)
    tokenizer = pipeline.get_tokenizer(config.data.source, config.data.tokenizer or None, f.checkpoint,
                                       cfg.vocab_size)
    prompt = [tokenizer.eos_id] + tokenizer.encode(f.prompt)  # EOS separates documents in training
    print(f"[{','.join(cfg.pattern)} x {cfg.num_repeats}, step {step}]", file=sys.stderr)
    sys.stdout.write(f.prompt)
    emitted: list[int] = []
    shown = ""

    def on_token(row: int, token: int) -> None:  # decode the whole continuation so pieces join correctly
        nonlocal shown
        emitted.append(token)
        text = tokenizer.decode(emitted)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

    generate(cfg, params, [prompt], f.max_new_tokens, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
             seed=f.seed, stop_tokens=[tokenizer.eos_id] if f.stop_at_eos else [], on_token=on_token,
             prefill_chunk=f.prefill_chunk)
    sys.stdout.write("\n")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("checkpoint", None, "A training workdir (config.json + checkpoints/).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample at this temperature.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample within this much probability mass (1: all).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_bool("stop_at_eos", True, "Stop at the end-of-document token.")
    flags.DEFINE_integer("prefill_chunk", 4096, "Prompt tokens per prefill pass (0: the whole prompt at once).")
    flags.mark_flags_as_required(["checkpoint"])
    app.run(main)
