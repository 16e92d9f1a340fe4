"""Generation: a parallel prefill that returns the decoding state, then one jitted step per token.

The state per scanned repeat is, for each Mamba sublayer, the last d_conv - 1 conv inputs and the
(d_inner, d_state) scan state, and for each attention sublayer a ring buffer of keys and values
(the last `window` for SWA; the whole context for full `attn` layers). So for Samba the memory is
constant in the number of tokens generated and in the prompt length. The prefill is the training
model itself (scan kernel, attention op) with the `decode_state` collection mutable; the step
re-applies the same Flax layers to one token (`Dense`, `RMSNorm`, `SwiGLU`), so the math is shared.
Prompts of different lengths: the shortest is prefilled for all rows at once, the rest of each
longer prompt is fed through decoding steps (its tokens forced instead of sampled).

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


def _ring(kv: jax.Array, length: int, slots: int) -> jax.Array:
    """(repeats, batch, length, ...) keys -> (repeats, batch, slots, ...): slot s holds the latest
    position p < length with p % slots == s (zeros where no such position exists)."""
    s = np.arange(slots)
    pos = (length - 1) - ((length - 1 - s) % slots)
    taken = jnp.take(kv, jnp.asarray(np.maximum(pos, 0)), axis=2)
    return jnp.where(jnp.asarray(pos >= 0).reshape((1, 1, slots) + (1,) * (kv.ndim - 3)), taken, 0)


def _ring_positions(length: int, slots: int, batch: int) -> jax.Array:
    s = np.arange(slots)
    pos = (length - 1) - ((length - 1 - s) % slots)
    return jnp.asarray(np.broadcast_to(np.where(pos >= 0, pos, -1), (batch, slots)), jnp.int32)


def prefill(cfg: ModelConfig, params: Any, tokens: jax.Array, max_len: int) -> tuple[jax.Array, dict]:
    """Runs the prompt (batch, length) through the parallel model.

    Returns the last position's logits (batch, vocab) float32 and the decoding state for positions
    length .. max_len - 1.
    """
    batch, length = tokens.shape
    logits, variables = SambaLM(cfg).apply({"params": params}, tokens, mutable=[DECODE_STATE])
    sown = variables[DECODE_STATE]["blocks"]
    layers = {}
    for i, kind in enumerate(cfg.pattern):
        if kind == "mamba":
            layers[f"mamba_{i}"] = sown[f"mamba_{i}"]["mamba"]
        elif kind in ("swa", "attn"):
            kv = sown[f"{kind}_{i}"]["kv"]
            slots = cache_length(cfg, kind, max_len)
            layers[f"{kind}_{i}"] = {name: _ring(kv[name], length, slots) for name in ("k", "v")}
    positions = {kind: _ring_positions(length, cache_length(cfg, kind, max_len), batch)
                 for kind in ("swa", "attn") if kind in cfg.pattern}
    state = {"layers": layers, "slot_positions": positions, "position": jnp.full((batch,), length, jnp.int32)}
    return logits[:, -1], state


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
    o = sliding_window_attention_decode(q[:, 0], cache["k"], cache["v"], slot_positions, position, window)
    out = Dense(cfg.d_model, ("heads", "embed"), dtype).apply({"params": p["o_proj"]}, o.reshape(batch, h * hd))
    return out, cache


def decode_step(cfg: ModelConfig, params: Any, state: dict, token: jax.Array) -> tuple[jax.Array, dict]:
    """token (batch,) int32 at state["position"] -> (logits (batch, vocab) float32, next state)."""
    position = state["position"]
    slot_positions = {kind: pos.at[jnp.arange(pos.shape[0]), position % pos.shape[1]].set(position)
                      for kind, pos in state["slot_positions"].items()}
    x = jnp.take(params["embed"]["embedding"], token, axis=0)  # (batch, d_model) float32

    def repeat(x, scanned):
        p, layer_state = scanned
        new_state = {}
        for i, kind in enumerate(cfg.pattern):
            h = RMSNorm(cfg.norm_eps).apply({"params": p[f"norm_{i}"]}, x)
            name = f"{kind}_{i}"
            if kind == "mamba":
                h, new_state[name] = _mamba_step(cfg, p[name], h, layer_state[name])
            elif kind == "mlp":
                h = SwiGLU(cfg.mlp_hidden, jnp.dtype(cfg.compute_dtype)).apply({"params": p[name]}, h)
            else:
                window = cfg.window if kind == "swa" else None
                h, new_state[name] = _attention_step(cfg, p[name], h, layer_state[name], slot_positions[kind],
                                                     position, window)
            x = x + h.astype(F32)
        return x, new_state

    x, layers = jax.lax.scan(repeat, x, (params["blocks"], state["layers"]))
    x = RMSNorm(cfg.norm_eps).apply({"params": params["final_norm"]}, x)
    dtype = jnp.dtype(cfg.compute_dtype)
    if cfg.tie_embeddings:
        logits = jnp.dot(x.astype(dtype), params["embed"]["embedding"].T.astype(dtype))
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
             stop_tokens: Sequence[int] = (), on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Continues each prompt (token ids, at least one each) by up to max_new_tokens tokens.

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
    logits, state = jax.jit(functools.partial(prefill, cfg, max_len=total))(params, jnp.asarray(padded[:, :first]))
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
             seed=f.seed, stop_tokens=[tokenizer.eos_id] if f.stop_at_eos else [], on_token=on_token)
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
    flags.mark_flags_as_required(["checkpoint"])
    app.run(main)
