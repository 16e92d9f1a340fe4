"""Sliding-window attention implementations side by side at a fixed number of tokens per step.

python benchmarks/sliding_window_attention.py                   # the issue's table (needs a GPU for cudnn)
python benchmarks/sliding_window_attention.py --seqs=8192 --windows=2048 --impls=cudnn,banded,pallas:128:64:8

16 query heads and 4 KV heads of dim 128 (GQA 4), bfloat16, batch = tokens / seq. Times are medians
over --iters calls after compilation; ratios are to cuDNN with the same window ("cudnn" row).
"causal" is full causal cuDNN attention (no window) for scale. FLOPs follow MaxText's convention:
forward 4 * head_dim * heads * (T*W - W^2/2) per sequence (QK^T and PV over the band; full causal
counted as T^2/2), training (forward+backward) 3x the forward.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import median_ms  # noqa: E402
from samba_jax.ops.attention import sliding_window_attention  # noqa: E402


def _attention_fn(impl: str, window):
    """impl: an implementation name, "causal" (full causal cuDNN), pallas:mosaic or pallas:triton (one
    backend at its default tiles), pallas:mosaic:FWD_KxSTAGES/DQ_KxSTAGES/DKV_QxSTAGES (e.g.
    pallas:mosaic:128x2/64x3/64x3), pallas:BLOCK_Q:BLOCK_K[:WARPS] (Triton, all three kernels), or
    pallas:FWD/DKV/DQ with each BLOCK_QxBLOCK_KxWARPSxSTAGES (Triton, e.g. pallas:128x64x8x3/64x64x8x2/64x64x8x2)."""
    if impl.startswith("pallas:"):
        from pallas_kernels.sliding_window_attention import kernels
        from pallas_kernels.sliding_window_attention import sliding_window_attention as pallas_attention

        spec = impl.split(":", 1)[1]
        if spec in ("mosaic", "triton"):
            return lambda q, k, v: pallas_attention(q, k, v, min(window, q.shape[1]), backend=spec)
        if spec.startswith("mosaic:"):
            from pallas_kernels.sliding_window_attention.mosaic_kernels import MosaicTiles

            tiles = MosaicTiles(*(int(x) for part in spec.split(":")[1].split("/") for x in part.split("x")))
            return lambda q, k, v: pallas_attention(q, k, v, min(window, q.shape[1]), backend="mosaic", tiles=tiles)
        if "x" in spec:
            tiles = kernels.Tiles(*(kernels.Tile(*(int(x) for x in t.split("x"))) for t in spec.split("/")))
            return lambda q, k, v: pallas_attention(q, k, v, min(window, q.shape[1]), tiles=tiles)
        block_q, block_k, *warps = (int(x) for x in spec.split(":"))
        return lambda q, k, v: pallas_attention(q, k, v, min(window, q.shape[1]), block_q=block_q, block_k=block_k,
                                                num_warps=warps[0] if warps else None)
    name = "cudnn" if impl == "causal" else impl
    return lambda q, k, v: sliding_window_attention(q, k, v, window, implementation=name)


def band_flops(batch, seq, window, heads, head_dim):
    w = min(window or seq, seq)
    pairs = seq * w - w * w / 2 if window else seq * seq / 2
    return 4 * head_dim * heads * pairs * batch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step (batch = tokens // seq)")
    p.add_argument("--seqs", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--windows", default="512,2048,4096")
    p.add_argument("--impls", default="cudnn,banded,causal")
    p.add_argument("--heads", default="16,4,128", help="q_heads,kv_heads,head_dim")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    q_heads, kv_heads, head_dim = (int(x) for x in args.heads.split(","))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {q_heads} q heads, {kv_heads} kv heads, "
          f"dim {head_dim}, bfloat16, {args.tokens} tokens per step (one batch-1 row when seq > tokens)\n")
    print("| seq | batch | window | impl | fwd ms | fwd+bwd ms | fwd vs cudnn | fwd+bwd vs cudnn | "
          "fwd TFLOP/s | train TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seq in (int(s) for s in args.seqs.split(",")):
        batch = max(1, args.tokens // seq)
        k = jax.random.split(jax.random.key(seq), 3)
        q = jax.random.normal(k[0], (batch, seq, q_heads, head_dim), jnp.bfloat16)
        kk = jax.random.normal(k[1], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(k[2], (batch, seq, kv_heads, head_dim), jnp.bfloat16)
        impls = args.impls.split(",")
        for window in (int(w) for w in args.windows.split(",")):
            base = None
            for impl in sorted(impls, key=lambda i: i != "cudnn"):  # the baseline first
                if impl == "causal" and window != int(args.windows.split(",")[0]):
                    continue  # one full-causal row per seq
                w = None if impl == "causal" else window
                fn = _attention_fn(impl, w)
                loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))  # noqa: E731
                try:
                    fwd = jax.jit(fn).lower(q, kk, v).compile()
                    both = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kk, v).compile()
                    f, fb = median_ms(fwd, q, kk, v, iters=args.iters), median_ms(both, q, kk, v, iters=args.iters)
                except Exception as e:  # noqa: BLE001  (an OOM is a table entry)
                    print(f"| {seq} | {batch} | {window} | {impl} | failed: {type(e).__name__}: {str(e)[:120]} "
                          "||||||")
                    continue
                base = (f, fb) if impl == "cudnn" else base
                ratio = f"{base[0] / f:.2f}x | {base[1] / fb:.2f}x" if base else "- | -"
                flops = band_flops(batch, seq, w, q_heads, head_dim)
                shown_window = "full" if impl == "causal" else window
                print(f"| {seq} | {batch} | {shown_window} | {impl} | {f:.2f} | {fb:.2f} | {ratio} | "
                      f"{flops / f / 1e9:.0f} | {3 * flops / fb / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
