"""Selective-scan implementations side by side: forward and forward+backward time, memory, floors.

python benchmarks/selective_scan.py                      # the issue's shapes and the models' shapes
python benchmarks/selective_scan.py --shapes=4x4096x4096 --dtypes=bfloat16 \\
  --impls=pallas,pallas:64:4:2:4:4,cm:16:4:32:2:1,chunked
python benchmarks/selective_scan.py --shapes=4x4096x4096 --impls=pallas --layouts=channels_last,channels_first

All inputs of mamba_ssm's training call (delta_bias + softplus, D, z gate; d_state 16). Times are
medians over --iters calls after compilation; memory is XLA's temporary allocation of the compiled
forward+backward. Ratios are to `associative` (whole-sequence lax.associative_scan). The floor is
the larger of the exponentials at the special-function rate (132 SMs x 16/clk x 1.98 GHz on H200)
and the forward's bytes (u, delta, z, y, B, C) at 3.4 TB/s. mamba_ssm's figures were taken in its own
layout, (batch, d_inner, seq): `--layouts=channels_first` times ours in that layout too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import median_ms  # noqa: E402
from samba_jax import ops  # noqa: E402

# mamba_ssm 2.3.2 on one H200 (selective-scan issue): (fwd ms, fwd+bwd ms) per (shape, dtype).
MAMBA_SSM_MS = {("4x4096x4096", "float32"): (2.31, 7.76), ("4x4096x4096", "bfloat16"): (1.16, 5.80),
                ("1x16384x4096", "float32"): (2.69, 8.60), ("1x16384x4096", "bfloat16"): (1.47, 6.77)}
EXP_PER_S = 132 * 16 * 1.98e9
HBM_BYTES_PER_S = 3.4e12


def inputs(batch, seq, width, dtype, d_state=16, layout="channels_last"):
    """The op's arguments; channels_first: u, delta, z (batch, d_inner, seq), B, C (batch, d_state, seq)."""
    k = jax.random.split(jax.random.key(0), 7)
    args = dict(
        u=jax.random.normal(k[0], (batch, seq, width), dtype),
        delta=jax.random.normal(k[1], (batch, seq, width), dtype),
        A=-jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (width, d_state)),
        B=jax.random.normal(k[2], (batch, seq, d_state), dtype),
        C=jax.random.normal(k[3], (batch, seq, d_state), dtype),
        D=jnp.ones((width,)), z=jax.random.normal(k[4], (batch, seq, width), dtype),
        delta_bias=jnp.full((width,), -4.0))
    if layout == "channels_first":
        args.update({k: jnp.swapaxes(args[k], 1, 2) for k in ("u", "delta", "z", "B", "C")})
    return args


def scan_fn(impl: str, layout: str = "channels_last"):
    """pallas:BLOCK_D[:FWD_PREFETCH:FWD_WARPS:BWD_PREFETCH:BWD_WARPS] (the step-by-step Triton kernel),
    cm:FWD_BLOCK_D:BWD_BLOCK_D[:CHUNK[:FWD_WARPS:BWD_WARPS[:ATOMIC[:FOUR_ROWS]]]] (the
    channel-major kernel; ATOMIC 1: dB, dC summed over blocks with atomic adds, 0: as per-block partials;
    FOUR_ROWS 0: their sums over a block's channels state by state by Triton's butterfly, not 4 states at
    once), or an ops
    implementation (pallas = the default kernel, pallas:triton = the step-by-step one at its defaults),
    optionally /SPLITS (the op's sequence_splits; /auto: its default for the shape), e.g. pallas/8.
    The fused kernel's other tuning knobs follow as +KNOB=VALUE on a cm string or on pallas (the
    channel-major kernels at their defaults), e.g. pallas+bwd_atomic_cols=0+bwd_four_row_sums=0."""
    impl, *extra = impl.split("+")
    extra = {key: int(value) for key, _, value in (knob.partition("=") for knob in extra)}
    if extra and impl != "pallas" and not impl.startswith("cm"):
        raise ValueError(f"+KNOB=VALUE applies to cm strings and to pallas, got {impl}")
    impl = "cm" if extra and impl == "pallas" else impl
    impl, _, splits = impl.partition("/")
    name, *knobs = impl.split(":")
    if name == "cm" or (name == "pallas" and knobs and knobs[0].isdigit()):  # kernel knobs
        if splits:
            raise ValueError(f"/SPLITS applies to ops implementations, not kernel knobs: {impl}")
        from pallas_kernels.selective_scan import selective_scan as fused

        if name == "cm":
            keys = ("fwd_block_d", "bwd_block_d", "chunk", "fwd_warps", "bwd_warps", "bwd_atomic_cols",
                    "bwd_four_row_sums")
            tuning = dict(zip(keys, (int(k) for k in knobs)), **extra)
            chunk = dict(chunk_size=tuning.pop("chunk")) if "chunk" in tuning else {}
            return lambda **a: fused(**a, delta_softplus=True, tuning=tuning, backend="triton_channel_major",
                                     layout=layout, **chunk)
        block_d, *rest = (int(k) for k in knobs)
        tuning = dict(zip(("fwd_prefetch", "fwd_warps", "bwd_prefetch", "bwd_warps"), rest))
        return lambda **a: fused(**a, delta_softplus=True, block_d=block_d, tuning=tuning, backend="triton",
                                 layout=layout)
    count = 1 if not splits else None if splits == "auto" else int(splits)  # an ops implementation name
    return lambda **a: ops.selective_scan(**a, delta_softplus=True, implementation=impl, sequence_splits=count,
                                          layout=layout)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x4096x4096,1x16384x4096,8x4096x3072,4x4096x4608,1x16384x3072")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default="pallas,pallas:triton,chunked,associative")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--layouts", default="channels_last",
                   help="channels_last (the model's), channels_first (mamba_ssm's (batch, d_inner, seq), which its "
                        "figures were taken in), or both, comma-separated")
    args = p.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}\n")
    print("| shape (b x seq x d_inner) | dtype | impl | layout | fwd ms | fwd+bwd ms | temp GiB | fwd vs assoc | "
          "fwd+bwd vs assoc | speed vs mamba_ssm (fwd, f+b) | fwd / floor | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    layouts = args.layouts.split(",")
    runs = [(impl, layout) for impl in sorted(args.impls.split(","), key=lambda i: i != "associative")  # baseline first
            for layout in (layouts[:1] if impl == "associative" else layouts)]  # the baseline once, first layout
    for shape in args.shapes.split(","):
        batch, seq, width = (int(x) for x in shape.split("x"))
        for dtype_name in args.dtypes.split(","):
            dtype = jnp.dtype(dtype_name)
            exps = batch * seq * width * 16
            nbytes = batch * seq * (4 * width + 2 * 16) * dtype.itemsize
            floor_ms = max(exps / EXP_PER_S, nbytes / HBM_BYTES_PER_S) * 1e3
            base, ref = None, MAMBA_SSM_MS.get((shape, dtype_name))
            for impl, layout in runs:
                a = inputs(batch, seq, width, dtype, layout=layout)
                scan = scan_fn(impl, layout)
                loss = lambda a, scan=scan: jnp.sum(scan(**a).astype(jnp.float32))  # noqa: E731
                row = f"| {shape} | {dtype_name} | {impl} | {layout} |"
                try:
                    t0 = time.perf_counter()
                    fwd = jax.jit(lambda a, scan=scan: scan(**a)).lower(a).compile()
                    both = jax.jit(jax.grad(loss, argnums=0)).lower(a).compile()
                    compile_s = time.perf_counter() - t0
                    mem = both.memory_analysis()
                    temp = mem.temp_size_in_bytes / 2**30 if mem is not None else float("nan")
                    f, fb = median_ms(fwd, a, iters=args.iters), median_ms(both, a, iters=args.iters)
                except Exception as e:  # noqa: BLE001  (an OOM or a lowering failure is a table entry)
                    print(f"{row} failed: {type(e).__name__}: {str(e)[:150]} ||||||||")
                    continue
                base = (f, fb) if impl == "associative" and base is None else base
                vs_assoc = f"{base[0] / f:.2f}x | {base[1] / fb:.2f}x" if base else "- | -"
                vs_ref = f"{ref[0] / f:.2f}x, {ref[1] / fb:.2f}x" if ref else "-"
                print(f"{row} {f:.2f} | {fb:.2f} | {temp:.2f} | {vs_assoc} | "
                      f"{vs_ref} | {f / floor_ms:.1f}x | {compile_s:.0f} |", flush=True)

if __name__ == "__main__":
    main()
