"""Launch the Pallas selective scan's kernels once each, for a profiler (Nsight Compute) to read.

    ncu --clock-control none --kernel-name regex:selective_scan --set full -o scan \\
      python benchmarks/profile_selective_scan.py --shape=4x4096x4096 --dtype=bfloat16

Runs, in order, an undifferentiated call (the forward-only kernel), then its gradient (the training
forward, then the backward), with the inputs of `benchmarks/selective_scan.py` (mamba_ssm's training
call: delta_bias + softplus, D, z gate, d_state 16). Both programs are compiled before either runs;
XLA's small kernels around the scan (pads, the dB/dC reductions) launch too, so filter by kernel
name as above. `--tuning` passes
kernel knobs as in `selective_scan(tuning=...)`, e.g. `--tuning=fwd_block_d=4,fwd_warps=1`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.selective_scan import inputs  # noqa: E402
from pallas_kernels.selective_scan import selective_scan  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4x4096x4096", help="batch x seq x d_inner")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--layout", default="channels_first", choices=("channels_first", "channels_last"))
    p.add_argument("--tuning", default="", help="comma-separated key=int kernel knobs")
    args = p.parse_args()
    batch, seq, width = (int(x) for x in args.shape.split("x"))
    tuning = {k: int(v) for k, v in (kv.split("=") for kv in args.tuning.split(",") if kv)}
    a = inputs(batch, seq, width, jnp.dtype(args.dtype), layout=args.layout)

    def scan(a):
        return selective_scan(**a, delta_softplus=True, layout=args.layout, tuning=tuning or None)

    forward = jax.jit(scan).lower(a).compile()
    gradient = jax.jit(jax.grad(lambda a: jnp.sum(scan(a).astype(jnp.float32)))).lower(a).compile()
    jax.block_until_ready(forward(a))
    jax.block_until_ready(gradient(a))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: launched the forward-only kernel, then the "
          f"training forward and the backward, at {args.shape} {args.dtype} {args.layout}")


if __name__ == "__main__":
    main()
