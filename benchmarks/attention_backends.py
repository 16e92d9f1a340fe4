"""Which Pallas GPU backend can reach cuDNN attention: the same dense problem through cuDNN, our
Triton-lowered SWA kernel (window = seq), jax's own Triton-lowered flash attention and jax's own
Mosaic GPU (Hopper, warp-specialised) flash attention. GPU only.

python benchmarks/attention_backends.py --shapes=8x4096,2x16384

16 query and 16 KV heads of dim 128 (jax's Triton kernel has no GQA). Causal rows: forward and
forward+backward, except Mosaic GPU, whose jax kernel has no causal backward (forward only).
Non-causal rows: cuDNN against Mosaic GPU forward+backward. Mosaic GPU runs float16 (jax's kernel
keeps float16 scratch) with scale 1, everything else bfloat16 with scale 1/sqrt(d); the matmul work
is the same. FLOPs: 4 * head_dim * heads * seq^2 per sequence, halved when causal (MaxText's
convention); ratios are time ratios to cuDNN in the same dtype family, >1 = faster than cuDNN.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import median_ms  # noqa: E402

HEADS, HEAD_DIM = 16, 128


def _implementations(seq: int):
    """name -> (fn(q, k, v), dtype, causal, has_backward)."""
    from pallas_kernels.sliding_window_attention import sliding_window_attention as ours

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu import attention as triton_mha
        from jax.experimental.pallas.ops.gpu import attention_mgpu as mgpu
    scale = 1 / math.sqrt(HEAD_DIM)
    triton_blocks = triton_mha.BlockSizes(block_q=128, block_k=64, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64,
                                          block_kv_dq=64)
    mgpu_config = functools.partial(mgpu.TuningConfig, block_q=64, block_kv=128, max_concurrent_steps=2,
                                    compute_wgs_bwd=2, block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    return {
        "cudnn causal": (functools.partial(cudnn, is_causal=True), jnp.bfloat16, True, True),
        "ours (Triton), window = seq": (lambda q, k, v: ours(q, k, v, seq), jnp.bfloat16, True, True),
        "jax Triton mha": (functools.partial(triton_mha.mha, segment_ids=None, sm_scale=scale, causal=True,
                                             block_sizes=triton_blocks), jnp.bfloat16, True, True),
        "cudnn causal fp16": (functools.partial(cudnn, is_causal=True, scale=1.0), jnp.float16, True, False),
        "jax Mosaic GPU causal": (functools.partial(mgpu.attention, config=mgpu_config(causal=True)), jnp.float16,
                                  True, False),
        "cudnn non-causal fp16": (functools.partial(cudnn, scale=1.0), jnp.float16, False, True),
        "jax Mosaic GPU non-causal": (functools.partial(mgpu.attention, config=mgpu_config(causal=False)),
                                      jnp.float16, False, True),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8x4096,2x16384", help="batch x seq list")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("attention_backends.py compares GPU kernels; run it on an NVIDIA GPU (Hopper for Mosaic GPU).")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; {HEADS} q / {HEADS} kv heads of {HEAD_DIM}\n")
    print("| batch x seq | impl | dtype | fwd ms | fwd TFLOP/s | fwd vs cudnn | fwd+bwd ms | train TFLOP/s | "
          "fwd+bwd vs cudnn |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.split("x"))
        base = {}
        for name, (fn, dtype, causal, backward) in _implementations(seq).items():
            ks = jax.random.split(jax.random.key(seq), 3)
            q, k, v = (jax.random.normal(key, (batch, seq, HEADS, HEAD_DIM), dtype) for key in ks)
            flops = 4 * HEAD_DIM * HEADS * seq * seq * batch / (2 if causal else 1)
            loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))  # noqa: E731
            try:
                f = median_ms(jax.jit(fn), q, k, v, iters=args.iters)
                fb = median_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v, iters=args.iters) if backward \
                    else None
            except Exception as e:  # noqa: BLE001  (a kernel that does not build is a table entry)
                print(f"| {shape} | {name} | {jnp.dtype(dtype).name} | failed: {type(e).__name__}: {str(e)[:100]} "
                      "||||||", flush=True)
                continue
            key = (jnp.dtype(dtype).name == "float16", causal)
            if name.startswith("cudnn"):
                base[key] = (f, fb)
            ref = base.get(key if key in base else (False, causal), (None, None))
            ratio = lambda mine, theirs: f"{theirs / mine:.2f}x" if mine and theirs else "-"  # noqa: E731
            fb_cols = f"{fb:.2f} | {3 * flops / fb / 1e9:.0f}" if fb else "- | -"
            print(f"| {shape} | {name} | {jnp.dtype(dtype).name} | {f:.2f} | {flops / f / 1e9:.0f} | "
                  f"{ratio(f, ref[0])} | {fb_cols} | {ratio(fb, ref[1])} |", flush=True)


if __name__ == "__main__":
    main()
