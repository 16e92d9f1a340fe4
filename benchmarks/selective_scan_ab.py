"""Interleaved A/B timing of selective-scan variants: ratios to the first, in one process.

    python benchmarks/selective_scan_ab.py --mode=fwd --shapes=4x4096x4096,1x16384x4096 \
      --impls=pallas,pallas+fwd_only_chunk=64
    python benchmarks/selective_scan_ab.py --mode=fwd+bwd --shapes=4x4096x4096 \
      --impls=pallas,pallas+bwd_atomic_cols=0,pallas+bwd_four_row_sums=0

`benchmarks/selective_scan.py` times one variant after another, and on an H200 (2026-12-06) the same
forward kernel measured 1.29-1.76 ms across four of its rows: drift between rows as large as the
differences sought. Here every variant is compiled first, then all are timed in turn, round after
round (`timing.interleaved_median_ms`), so drift reaches them alike. Impl strings as in
`selective_scan.py` (`scan_fn`); inputs bfloat16 unless --dtype says otherwise, in mamba_ssm's
channels-first layout unless --layout says otherwise. Take the baseline as `pallas` (the defaults)
and change one knob per variant (`pallas+KNOB=...`): a cm string fixes every knob, also those whose
default depends on the shape (four-row sums on the partial-sum path are off above 2048 backward
programs). fwd times an undifferentiated call (the forward-only tiles); fwd+bwd the gradient (the
training forward and the backward).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.selective_scan import inputs, scan_fn  # noqa: E402
from benchmarks.timing import interleaved_median_ms  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--shapes", default="4x4096x4096,1x16384x4096,8x4096x3072")
    p.add_argument("--impls", required=True, help="comma-separated; the first is the baseline of the ratios")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layout", default="channels_first", choices=("channels_first", "channels_last"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--calls", type=int, default=5, help="calls per variant per round")
    args = p.parse_args()
    impls = args.impls.split(",")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.mode}, {args.dtype}, {args.layout}, "
          f"median of {args.rounds} interleaved rounds of {args.calls} calls\n")
    print("| shape (b x seq x d_inner) | impl | ms | speed vs first |")
    print("|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, seq, width = (int(x) for x in shape.split("x"))
        a = inputs(batch, seq, width, jnp.dtype(args.dtype), layout=args.layout)
        fns = {}
        for impl in impls:
            scan = scan_fn(impl, args.layout)
            if args.mode == "fwd":
                fn = jax.jit(lambda a, scan=scan: scan(**a))
            else:
                fn = jax.jit(jax.grad(lambda a, scan=scan: jnp.sum(scan(**a).astype(jnp.float32))))
            fns[impl] = fn.lower(a).compile()
        ms = interleaved_median_ms(fns, a, rounds=args.rounds, calls=args.calls)
        for impl in impls:
            print(f"| {shape} | {impl} | {ms[impl]:.3f} | {ms[impls[0]] / ms[impl]:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
