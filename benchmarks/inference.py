"""Inference: Samba against a Llama-3-style GQA Transformer of equal size, as the paper measures.

python benchmarks/inference.py                       # samba_1b vs llama3_1b on one GPU (random weights)
python benchmarks/inference.py --prefill_seqs=4096,16384 --decode_tokens=4096 --decode_points=1024,4096

Prompt throughput: one sequence of each length through `generate.prefill` in one piece (the
training model: fused scan, cuDNN attention), tokens/s; for the Transformer also its model FLOP
rate (forward FLOPs per token, MaxText convention with causal attention halved) next to the
measured bf16 matmul rate. Decode: batch `--decode_batch`, `--decode_tokens` new tokens. Samba's
step costs the same at every position (constant state), so its rate is measured once. The
Transformer's step reads a KV cache that grows with the context, so its step time is measured
with the cache filled to each of `--decode_points` (cache capacity = fill, random keys) and
integrated over the generation (trapezoid rule) — it is never charged for empty slots. Its bytes
per step (weights + KV cache) over the step time are shown against HBM bandwidth. Decode memory:
the decoding state's bytes at 4K and at 1M context.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import median_ms  # noqa: E402
from samba_jax import generate  # noqa: E402
from samba_jax.config import ModelConfig, flops_per_token, parameter_count  # noqa: E402
from samba_jax.configs.base import load_experiment  # noqa: E402
from samba_jax.model.samba import SambaLM  # noqa: E402
from samba_jax.ops.selective_scan import default_sequence_splits, resolve_implementation  # noqa: E402

PAPER = {"prefill_128k": 3.73, "decode_64k": 3.64}


def build(experiment: str, overrides: dict) -> tuple[ModelConfig, dict]:
    config = load_experiment(experiment)
    config.model.update(overrides)
    cfg = ModelConfig.from_config(config.model)
    init = jax.jit(lambda key: nn.unbox(SambaLM(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]))
    return cfg, init(jax.random.key(0))


def prefill_rate(cfg, params, seq, iters):
    tokens = jax.random.randint(jax.random.key(seq), (1, seq), 0, cfg.vocab_size)
    run = jax.jit(lambda p, t: generate.prefill(cfg, p, t, max_len=seq + 1)[0])
    return seq / (median_ms(run, params, tokens, iters=iters) / 1e3)


def synthetic_state(cfg, batch, fill, capacity):
    """A decoding state at position `fill` with caches of `capacity` slots (filled with constants)."""
    layers = {}
    dtype, r = jnp.dtype(cfg.compute_dtype), cfg.num_repeats
    for i, kind in enumerate(cfg.pattern):  # per repeat, as generate.prefill returns it
        if kind == "mamba":
            layers[f"mamba_{i}"] = tuple(
                {"conv": jnp.zeros((batch, cfg.ssm_conv - 1, cfg.d_inner), jnp.float32),
                 "h": jnp.zeros((batch, cfg.d_inner, cfg.ssm_state), jnp.float32)} for _ in range(r))
        elif kind in ("swa", "attn"):
            shape = (batch, generate.cache_length(cfg, kind, capacity), cfg.num_kv_heads, cfg.head_dim)
            # Any values do for timing; filled ones compile in seconds where 2 x repeats RNG calls took minutes.
            layers[f"{kind}_{i}"] = tuple({n: jnp.full(shape, 0.01 * (j + 1), dtype) for n in "kv"} for j in range(r))
    slot_positions = {kind: jnp.broadcast_to(jnp.where(jnp.arange(s) < fill, jnp.arange(s), -1), (batch, s))
                      .astype(jnp.int32)
                      for kind in ("swa", "attn") if kind in cfg.pattern
                      for s in [generate.cache_length(cfg, kind, capacity)]}
    return {"layers": layers, "slot_positions": slot_positions, "position": jnp.full((batch,), fill, jnp.int32)}


def decode_step_time(cfg, params, batch, fill, capacity, steps=64, iters=3):
    """Seconds per decoding step (greedy, `steps` steps in one jitted scan) at context `fill`.

    The state is donated, so the caches are updated in place (a 64K x batch 16 cache is ~45 GB).
    """
    def run(params, state):
        def body(carry, _):
            token, state = carry
            logits, state = generate.decode_step(cfg, params, state, token)
            return (jnp.argmax(logits, -1).astype(jnp.int32), state), None

        (token, state), _ = jax.lax.scan(body, (jnp.zeros((batch,), jnp.int32), state), None, length=steps)
        return token, state  # returned, so the donated caches are updated in place

    params = generate.decode_params(cfg, params)  # split per repeat once, as generate.generate does
    make_state, run = jax.jit(lambda: synthetic_state(cfg, batch, fill, capacity)), jax.jit(run, donate_argnums=1)
    times = []
    for _ in range(iters + 1):  # the first call compiles
        state = jax.block_until_ready(make_state())
        start = time.perf_counter()
        out = jax.block_until_ready(run(params, state))
        times.append(time.perf_counter() - start)
        del out, state
    return statistics.median(times[1:]) / steps


def state_bytes(cfg, batch, context):
    state = jax.eval_shape(lambda: synthetic_state(cfg, batch, context, context))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["layers"]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samba", default="experiments/samba_1b.py")
    p.add_argument("--transformer", default="experiments/llama3_1b.py")
    p.add_argument("--override", action="append", default=[], help="model field=value for both (e.g. for CPU)")
    p.add_argument("--prefill_seqs", default="4096,16384,65536,131072,262144")
    p.add_argument("--decode_batch", type=int, default=16)
    p.add_argument("--decode_tokens", type=int, default=65536)
    p.add_argument("--decode_points", default="256,4096,16384,32768,65536")
    p.add_argument("--matmul_tflops", type=float, default=694.0, help="measured bf16 matmul rate (issue 7)")
    p.add_argument("--hbm_tb_s", type=float, default=3.4, help="measured HBM bandwidth (selective-scan issue)")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.lstrip("-").isdigit() else value
    samba, transformer = build(args.samba, overrides), build(args.transformer, overrides)
    names = {id(samba): os.path.basename(args.samba), id(transformer): os.path.basename(args.transformer)}
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; random weights; "
          f"{names[id(samba)]} {parameter_count(samba[0])['total'] / 1e6:.1f}M vs {names[id(transformer)]} "
          f"{parameter_count(transformer[0])['total'] / 1e6:.1f}M\n")

    print("| prompt tokens | samba tok/s | transformer tok/s | ratio | transformer model TFLOP/s (of "
          f"{args.matmul_tflops:.0f}) | samba scan sequence splits |\n|---|---|---|---|---|---|")
    for seq in (int(s) for s in args.prefill_seqs.split(",") if s):
        rates = []
        for cfg, params in (samba, transformer):
            try:
                rates.append(prefill_rate(cfg, params, seq, args.iters))
            except Exception as e:  # noqa: BLE001  (out of memory is a table entry)
                rates.append(None)
                print(f"<!-- {seq}: {type(e).__name__}: {str(e)[:100]} -->")
        s, t = rates
        tflops = t * flops_per_token(transformer[0], seq)["forward"] / 1e12 if t else None
        print(f"| {seq} | {s:,.0f} | " if s else f"| {seq} | failed | ", end="")
        scan = samba[0].scan_implementation or None
        splits = samba[0].scan_sequence_splits or default_sequence_splits(resolve_implementation(scan), 1, seq,
                                                                           samba[0].d_inner)
        print(f"{t:,.0f} | {s / t:.2f}x | {tflops:.0f} |" if t and s else f"{t or 'failed'} | - | - |", end="")
        print(f" {splits} |", flush=True)

    batch, total = args.decode_batch, args.decode_tokens
    samba_step = decode_step_time(*samba, batch, fill=4096, capacity=4096 + total)
    print(f"\nDecode, batch {batch}: samba {samba_step * 1e3:.2f} ms/step at every context "
          f"({batch / samba_step:,.0f} tok/s)\n")
    weights = parameter_count(transformer[0])["total"] * 2  # bf16
    print(f"| transformer context | ms/step | tok/s | GB read/step (weights + KV) | TB/s (of {args.hbm_tb_s}) |")
    print("|---|---|---|---|---|")
    times = {}
    for fill in (int(x) for x in args.decode_points.split(",")):
        try:
            times[fill] = decode_step_time(*transformer, batch, fill=fill, capacity=fill)
        except Exception as e:  # noqa: BLE001  (out of memory is a table entry)
            print(f"| {fill} | failed: {type(e).__name__}: {str(e)[:80]} ||||")
            continue
        read = weights + state_bytes(transformer[0], batch, fill)
        print(f"| {fill} | {times[fill] * 1e3:.2f} | {batch / times[fill]:,.0f} | {read / 1e9:.1f} | "
              f"{read / times[fill] / 1e12:.2f} |", flush=True)
    # Integrate the Transformer's step time over contexts 0 .. total (linear between measured fills;
    # below the first fill its time, beyond the last the last one's: both favour the Transformer
    # only if the largest fill is short of `total`, which the table then shows).
    points = sorted(times)
    transformer_s = float(np.sum(np.interp(np.arange(total), points, [times[f] for f in points])))
    samba_s = samba_step * total
    print(f"\nDecode, batch {batch}, {total} new tokens: samba {batch * total / samba_s:,.0f} tok/s, transformer "
          f"{batch * total / transformer_s:,.0f} tok/s; ratio {transformer_s / samba_s:.2f}x "
          f"(paper {PAPER['decode_64k']}x; transformer measured up to {points[-1]} context)")
    mib = {ctx: state_bytes(samba[0], batch, ctx) / 2**20 for ctx in (4096, 1 << 20)}
    gib = {ctx: state_bytes(transformer[0], batch, ctx) / 2**30 for ctx in (4096, 1 << 20)}
    print(f"\nDecoding state at 4K / 1M context, batch {batch}: samba {mib[4096]:.1f} / {mib[1 << 20]:.1f} MiB; "
          f"transformer {gib[4096]:.2f} / {gib[1 << 20]:.1f} GiB")
    print(f"(paper: {PAPER['prefill_128k']}x prompt throughput at 128K, {PAPER['decode_64k']}x decode over 64K)")


if __name__ == "__main__":
    main()
