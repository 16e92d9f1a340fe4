"""Throughput of the whole train step (forward, backward, AdamW) on synthetic tokens; one table.

python benchmarks/train_step.py --experiment=experiments/samba_421m.py --micro_batches=16,8,4 --seq_len=4096

For each experiment, micro-batches are tried largest first, each in its own process (an
out-of-memory compile leaves nothing behind), and every size that fits is reported, so the
table shows the largest micro-batch that fits. Tokens/s is the step's tokens over its median
wall time; MFU uses `samba_jax.config.flops_per_token` (MaxText's convention: matmuls 2 FLOPs
per MAC, causal attention halved, sliding window T*W - W^2/2, training 3x forward, plus the
selective scan's 9*d_inner*d_state per token) over the chip's dense bf16 peak. Baseline: the
PyTorch reference stack on the same GPU, as quoted in the selective-scan issue.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# PyTorch reference (mamba_ssm + flash-attn, bf16 autocast, micro-batch 8 x 4096) on one H200.
PYTORCH_TOKENS_PER_SEC = {"samba_421m": 121_000, "samba_1b": 46_000}


def measure(experiment: str, micro_batch: int, seq_len: int, steps: int, overrides: dict) -> dict:
    import jax
    import numpy as np

    from samba_jax.config import ModelConfig, flops_per_token, parameter_count, peak_flops_per_device
    from samba_jax.configs.base import load_experiment
    from samba_jax.model.samba import SambaLM
    from samba_jax.trainer import init_state, make_optimizer, make_train_step

    config = load_experiment(experiment)
    config.model.update(overrides)
    model_cfg = ModelConfig.from_config(config.model)
    tx, schedule = make_optimizer(config.optimizer, config.num_train_steps)
    state = init_state(model_cfg, tx, jax.random.key(0))
    step = make_train_step(SambaLM(model_cfg), tx, schedule)
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (1, micro_batch, seq_len + 1), np.int32)

    t0 = time.perf_counter()
    state, m = step(state, tokens)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, tokens)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_sec = micro_batch * seq_len / step_s
    device = jax.devices()[0]
    peak = peak_flops_per_device(device.device_kind)
    flops = flops_per_token(model_cfg, seq_len)["train"]
    stats = device.memory_stats() or {}
    return {
        "experiment": os.path.basename(experiment).removesuffix(".py"),
        "micro_batch": micro_batch, "seq_len": seq_len,
        "params_m": parameter_count(model_cfg)["total"] / 1e6,
        "compile_s": compile_s, "step_ms": step_s * 1e3, "tokens_per_sec": tokens_per_sec,
        "tflops": tokens_per_sec * flops / 1e12, "mfu": tokens_per_sec * flops / peak if peak else None,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "loss": float(m["loss"]),
        "device": device.device_kind, "jax": jax.__version__,
        "scan": model_cfg.scan_implementation or "default", "attention": model_cfg.attention_implementation or "default",
        "remat": model_cfg.remat,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", action="append", required=True)
    parser.add_argument("--micro_batches", default="8", help="comma-separated, tried largest first")
    parser.add_argument("--seq_len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--override", action="append", default=[], help="model field=value, e.g. remat=block")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per (experiment, micro-batch)")
    parser.add_argument("--json_out", default="")
    parser.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.isdigit() else value

    if args._one:  # child process: one measurement, one JSON line
        print("RESULT " + json.dumps(measure(args.experiment[0], int(args.micro_batches), args.seq_len,
                                             args.steps, overrides)), flush=True)
        return

    rows = []
    for experiment in args.experiment:
        for mb in sorted((int(x) for x in args.micro_batches.split(",")), reverse=True):
            cmd = [sys.executable, __file__, "--_one", f"--experiment={experiment}", f"--micro_batches={mb}",
                   f"--seq_len={args.seq_len}", f"--steps={args.steps}", *[f"--override={o}" for o in args.override]]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{experiment} micro-batch {mb}: timed out", flush=True)
                continue
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                reason = "out of memory" if "RESOURCE_EXHAUSTED" in out.stderr else out.stderr[-1500:]
                print(f"{experiment} micro-batch {mb}: {reason}", flush=True)
                continue
            row = json.loads(lines[0][len("RESULT "):])
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)

    print("\n| experiment | micro-batch x seq | params | step | tokens/s | vs PyTorch ref | TFLOP/s | MFU | "
          "peak mem | compile |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = PYTORCH_TOKENS_PER_SEC.get(r["experiment"])
        ratio = f"{r['tokens_per_sec'] / ref:.2f}x" if ref else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"| {r['experiment']} | {r['micro_batch']} x {r['seq_len']} | {r['params_m']:.1f}M | "
              f"{r['step_ms']:.0f} ms | {r['tokens_per_sec']:,.0f} | {ratio} | {r['tflops']:.0f} | {mfu} | "
              f"{r['peak_gib']:.1f} GiB | {r['compile_s']:.0f} s |")
    if rows:
        print(f"\n{rows[0]['device']}, jax {rows[0]['jax']}; scan={rows[0]['scan']}, attention={rows[0]['attention']}, "
              f"remat={rows[0]['remat']}. MFU: MaxText FLOP convention + selective-scan work, dense bf16 peak.")


if __name__ == "__main__":
    main()
