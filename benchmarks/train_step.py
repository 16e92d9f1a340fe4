"""Throughput of the whole train step (forward, backward, AdamW) on synthetic tokens; one table.

python benchmarks/train_step.py --experiment=experiments/samba_421m.py --micro_batches=16,8,4 --seq_len=4096
python benchmarks/train_step.py --experiment=experiments/samba_1b.py --mesh=fsdp=1 --mesh=fsdp=2 \
  --micro_batches=8 --per_batch_shard --override=remat=block      # scaling over 1 and 2 devices
python benchmarks/train_step.py --experiment=experiments/samba_1b.py --mesh=context=2 --micro_batches=1 \
  --seq_len=131072,262144,524288 --override=remat=block          # longest sequence that trains

For each experiment (and mesh), micro-batches are tried largest first, each in its own process (an
out-of-memory compile leaves nothing behind), and every size that fits is reported, so the
table shows the largest micro-batch that fits. Several --seq_len are tried shortest first and the
longer ones skipped after the first that does not fit. Without --mesh the step runs unsharded on
one device; with --mesh (e.g. `fsdp=2`, `fsdp=1,tensor=2`, `context=2`; repeatable) it runs the
trainer's sharded step (samba_jax.sharding: state sharded by the logical-axis rules, tokens placed
with the batch sharding) on the first prod(degrees) devices, exactly as samba_jax.train does, and
`--per_batch_shard` multiplies the micro-batch by data*fsdp (weak scaling). "vs 1 device" divides
tokens/s by that of the 1-device row of the same experiment and sequence in the same run.
Tokens/s is the step's tokens over its median wall time; MFU uses
`samba_jax.config.flops_per_token` (MaxText's convention: matmuls 2 FLOPs per MAC, causal
attention halved, sliding window T*W - W^2/2, training 3x forward, plus the selective scan's
9*d_inner*d_state per token) over the chip's dense bf16 peak times the devices. Baseline: the
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


def parse_mesh(spec: str) -> dict[str, int]:
    """'fsdp=2,tensor=1' -> {'data': 1, 'fsdp': 2, 'tensor': 1, 'context': 1}."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}
    for item in filter(None, spec.split(",")):
        axis, _, size = item.partition("=")
        if axis not in sizes or not size.isdigit():
            raise SystemExit(f"--mesh={spec}: expected axis=size pairs over {sorted(sizes)}, e.g. fsdp=2,tensor=1")
        sizes[axis] = int(size)
    return sizes


def measure(experiment: str, micro_batch: int, seq_len: int, steps: int, overrides: dict, mesh_spec: str) -> dict:
    import math

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
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (1, micro_batch, seq_len + 1), np.int32)
    if not mesh_spec:
        state = init_state(model_cfg, tx, jax.random.key(0))
        step = make_train_step(SambaLM(model_cfg), tx, schedule)
        devices = 1
    else:  # the trainer's sharded path (samba_jax/train_loop.py)
        from samba_jax import sharding
        from samba_jax.trainer import abstract_boxed_state, init_state_on_mesh

        sizes = parse_mesh(mesh_spec)
        devices = math.prod(sizes.values())
        sharding.check_model_fits_mesh(model_cfg, sizes, seq_len, micro_batch)
        mesh, rule_table = sharding.make_mesh(sizes, jax.devices()[:devices]), sharding.rules(config)
        state_shardings = sharding.state_shardings(abstract_boxed_state(model_cfg, tx), mesh, rule_table)
        tokens_sharding = sharding.batch_sharding(mesh, rule_table)
        state = init_state_on_mesh(model_cfg, tx, jax.random.key(0), state_shardings)
        step = make_train_step(SambaLM(model_cfg), tx, schedule, mesh=mesh, rule_table=rule_table,
                               state_sharding=state_shardings, batch_sharding=tokens_sharding)
        tokens = jax.device_put(tokens, tokens_sharding)

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
    if os.environ.get("TRAIN_STEP_PROFILE_DIR"):  # a trace of two more steps, for xprof / TensorBoard
        with jax.profiler.trace(os.path.join(os.environ["TRAIN_STEP_PROFILE_DIR"],
                                           (mesh_spec or "unsharded").replace("=", "").replace(",", "_"))):
            for _ in range(2):
                state, m = step(state, tokens)
            jax.block_until_ready(m)
    tokens_per_sec = micro_batch * seq_len / step_s
    device = jax.devices()[0]
    peak = peak_flops_per_device(device.device_kind)
    flops = flops_per_token(model_cfg, seq_len)["train"]
    peak_bytes = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices()[:devices])
    return {
        "experiment": os.path.basename(experiment).removesuffix(".py"), "mesh": mesh_spec or "-",
        "devices": devices, "micro_batch": micro_batch, "seq_len": seq_len,
        "params_m": parameter_count(model_cfg)["total"] / 1e6,
        "compile_s": compile_s, "step_ms": step_s * 1e3, "tokens_per_sec": tokens_per_sec,
        "tflops": tokens_per_sec * flops / 1e12, "mfu": tokens_per_sec * flops / (peak * devices) if peak else None,
        "peak_gib": peak_bytes / 2**30, "loss": float(m["loss"]),
        "device": device.device_kind, "jax": jax.__version__,
        "scan": model_cfg.scan_implementation or "default",
        "attention": model_cfg.attention_implementation or "default",
        "remat": model_cfg.remat,
    }


def child_command(args, experiment: str, mesh_spec: str, micro_batch: int, seq_len: int) -> list[str]:
    return [sys.executable, __file__, "--_one", f"--experiment={experiment}", f"--micro_batches={micro_batch}",
            f"--seq_len={seq_len}", f"--steps={args.steps}", f"--mesh={mesh_spec}",
            *[f"--override={o}" for o in args.override]]


def run_one(args, experiment: str, mesh_spec: str, micro_batch: int, seq_len: int) -> dict | str:
    """One measurement in a child process: its row, or why there is none."""
    cmd = child_command(args, experiment, mesh_spec, micro_batch, seq_len)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return "timed out"
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return "out of memory" if "RESOURCE_EXHAUSTED" in out.stderr else out.stderr[-1500:]
    return json.loads(lines[0][len("RESULT "):])


def runs(args):
    """(experiment, mesh, seq_len, micro-batches largest first) in the order the run tries them."""
    for experiment in args.experiment:
        for mesh_spec in args.mesh or [""]:
            sizes = parse_mesh(mesh_spec)
            scale = sizes["data"] * sizes["fsdp"] if args.per_batch_shard else 1
            for seq_len in sorted(int(x) for x in args.seq_len.split(",")):
                yield experiment, mesh_spec, seq_len, sorted((int(x) * scale for x in args.micro_batches.split(",")),
                                                             reverse=True)


def dry_run(args, overrides: dict) -> None:
    """Print each child command the run would start, after the checks it makes before compiling; no device used."""
    import math
    import shlex

    from samba_jax import sharding
    from samba_jax.config import ConfigError, ModelConfig, parameter_count
    from samba_jax.configs.base import load_experiment

    for experiment, mesh_spec, seq_len, micro_batches in runs(args):
        config = load_experiment(experiment)
        config.model.update(overrides)
        model_cfg = ModelConfig.from_config(config.model)
        sizes = parse_mesh(mesh_spec)
        devices = math.prod(sizes.values())
        print(f"# {experiment}: {parameter_count(model_cfg)['total'] / 1e6:.1f}M parameters, "
              f"mesh {mesh_spec or '- (unsharded)'}: {devices} device(s), seq {seq_len}", flush=True)
        for mb in micro_batches:
            try:
                sharding.check_model_fits_mesh(model_cfg, sizes, seq_len, mb)
            except ConfigError as e:
                print(f"# micro-batch {mb}: would fail: {e}")
                continue
            print(shlex.join(child_command(args, experiment, mesh_spec, mb, seq_len)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", action="append", required=True)
    parser.add_argument("--micro_batches", default="8", help="comma-separated, tried largest first")
    parser.add_argument("--seq_len", default="4096", help="comma-separated, tried shortest first")
    parser.add_argument("--mesh", action="append", default=[],
                        help="mesh degrees, e.g. fsdp=2 or fsdp=1,tensor=2 (repeatable); none: unsharded, 1 device")
    parser.add_argument("--per_batch_shard", action="store_true",
                        help="micro-batches are per data*fsdp shard (weak scaling)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--override", action="append", default=[], help="model field=value, e.g. remat=block")
    parser.add_argument("--timeout", type=int, default=400, help="seconds per (experiment, micro-batch)")
    parser.add_argument("--json_out", default="")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the command of every measurement and the mesh checks; needs no devices")
    parser.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {}
    for item in args.override:
        key, _, value = item.partition("=")
        overrides[key] = int(value) if value.isdigit() else value

    if args._one:  # child process: one measurement, one JSON line
        print("RESULT " + json.dumps(measure(args.experiment[0], int(args.micro_batches), int(args.seq_len),
                                             args.steps, overrides, args.mesh[0] if args.mesh else "")), flush=True)
        return

    if args.dry_run:
        dry_run(args, overrides)
        return

    rows, too_long = [], set()
    for experiment, mesh_spec, seq_len, micro_batches in runs(args):
        if (experiment, mesh_spec) in too_long:
            continue  # a shorter sequence did not fit
        fitted = False
        for mb in micro_batches:
            row = run_one(args, experiment, mesh_spec, mb, seq_len)
            if isinstance(row, str):
                print(f"{experiment} mesh {mesh_spec or '-'} micro-batch {mb} x {seq_len}: {row}", flush=True)
                continue
            fitted = True
            rows.append(row)
            print(json.dumps(row), flush=True)
        if not fitted:
            too_long.add((experiment, mesh_spec))  # longer sequences will not fit either
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)

    one_device = {(r["experiment"], r["seq_len"]): r["tokens_per_sec"] for r in rows if r["devices"] == 1}
    print("\n| experiment | mesh | devices | micro-batch x seq | params | step | tokens/s | vs 1 device | "
          "per device vs 1 | vs PyTorch ref (1 GPU) | TFLOP/s | MFU | peak mem/device | compile |\n"
          + "|---" * 14 + "|")
    for r in rows:
        ref = PYTORCH_TOKENS_PER_SEC.get(r["experiment"])
        ratio = f"{r['tokens_per_sec'] / ref:.2f}x" if ref and r["devices"] == 1 else "-"
        base = one_device.get((r["experiment"], r["seq_len"]))
        scaling = f"{r['tokens_per_sec'] / base:.2f}x" if base and r["devices"] > 1 else "-"
        per_device = f"{r['tokens_per_sec'] / base / r['devices']:.2f}" if base and r["devices"] > 1 else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        print(f"| {r['experiment']} | {r['mesh']} | {r['devices']} | {r['micro_batch']} x {r['seq_len']} | "
              f"{r['params_m']:.1f}M | {r['step_ms']:.0f} ms | {r['tokens_per_sec']:,.0f} | {scaling} | {per_device} | "
              f"{ratio} | "
              f"{r['tflops']:.0f} | {mfu} | {r['peak_gib']:.1f} GiB | {r['compile_s']:.0f} s |")
    if rows:
        print(f"\n{rows[0]['device']}, jax {rows[0]['jax']}; scan={rows[0]['scan']}, attention={rows[0]['attention']}, "
              f"remat={rows[0]['remat']}. MFU: MaxText FLOP convention + selective-scan work, dense bf16 peak "
              f"per device times devices.")


if __name__ == "__main__":
    main()
