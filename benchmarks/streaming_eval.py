"""Streaming evaluation at long lengths: tokens/s and peak memory against the one-piece prefill.

python benchmarks/streaming_eval.py --experiment=experiments/samba_1b.py --lengths=16384,131072,1048576

Random weights and random tokens (speed and memory do not depend on them). Each length runs in its
own child process, so the device's peak memory is that length's alone. Each child streams one row
of `length` tokens through `samba_jax.evaluate.streaming` in chunks of `--chunk` (per-token NLL,
the state carried); the rate excludes the first chunk (compiling). The baseline in the same run:
`generate.prefill` of one `--prefill` token sequence in one piece (the training kernels, last
logits only), tokens/s, the median of `--iters`. A length that does not fit (full attention's cache
grows) is reported with the evaluator's own message.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.inference import build, prefill_rate  # noqa: E402


def child(args) -> dict:
    from samba_jax.config import ConfigError
    from samba_jax.evaluate import perplexity, results

    cfg, params = build(args.experiment, {})
    length = args.length
    try:
        check = perplexity.check_fits(cfg, params, 1, length, args.chunk)
    except ConfigError as e:
        return {"length": length, "error": str(e)}
    rows = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, length + 1)).astype(np.int32)
    t0 = time.perf_counter()
    nll, timing = perplexity.stream(cfg, params, rows, args.chunk)
    return {"length": length, "tokens_per_second": timing["tokens_per_second"],
            "wall_seconds": time.perf_counter() - t0,
            "peak_bytes": results.peak_memory_bytes(), "state_bytes": check["state_bytes"],
            "estimated_bytes": check["estimated_bytes"], "mean_nll": float(nll.mean())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", default="experiments/samba_1b.py")
    p.add_argument("--lengths", default="16384,131072,1048576")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--prefill", type=int, default=131072, help="one-piece prefill length (0: skip)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)  # child mode
    args = p.parse_args()
    if args.length:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    print(f"{args.experiment} on {jax.devices()[0].device_kind}, jax {jax.__version__}, chunk {args.chunk}")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        cmd = [sys.executable, __file__, f"--experiment={args.experiment}", f"--chunk={args.chunk}",
               f"--length={length}"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        found = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        rows.append(json.loads(found[0][7:]) if found else {"length": length, "error": out.stderr[-600:]})
        print(rows[-1], flush=True)
    base = None
    if args.prefill:
        cfg, params = build(args.experiment, {})
        base = prefill_rate(cfg, params, args.prefill, args.iters)
    print(f"\n| length | streaming tokens/s | vs one-piece prefill at {args.prefill:,} | peak GiB | state GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['length']:,} | did not run: {r['error'].splitlines()[-1][:300]} | | | |")
            continue
        ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "-"
        state = r["state_bytes"] / 2**30
        print(f"| {r['length']:,} | {r['tokens_per_second']:,.0f} | {ratio} | {peak} | {state:.3f} |")
    if base:
        print(f"\none-piece prefill of {args.prefill:,} tokens: {base:,.0f} tokens/s")
    ok = [r for r in rows if "error" not in r and r["peak_bytes"]]
    if len(ok) > 1:
        print(f"peak memory, longest over shortest: {ok[-1]['peak_bytes'] / ok[0]['peak_bytes']:.3f}x")


if __name__ == "__main__":
    main()
