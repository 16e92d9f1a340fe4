"""Static counts of the channel-major scan kernels' SASS, compiled for sm_90 without a GPU.

    pip install -e ".[sass]"   # upstream Triton 3.5.1: its compiler, ptxas and cuobjdump
    python benchmarks/kernel_sass_counts.py --kernel=backward --variants=base,four_rows
    python benchmarks/kernel_sass_counts.py --kernel=forward

Lowers a kernel through Pallas to Triton IR for CUDA on any machine (the GPU query is stubbed with
compute capability 9.0), compiles that IR with upstream Triton and ptxas (not XLA's own pipeline,
so the numbers are indicative; for the backward's two tile variants the registers match what
Nsight Compute read from XLA's build on an H100, 168 and 255), and prints registers and the number
of instructions of each kind in the whole kernel. The tile loop holds almost all of them: one pass
over one tile of 4 channels x 32 steps for the backward, 16 x 32 on 2 warps for the training
forward (d_state 16, bf16 inputs, mamba_ssm's training call). BAR, STS and LDS count the layout
conversions Triton routes through shared memory.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import types
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration  # noqa: E402

from pallas_kernels.selective_scan import triton_channel_major_kernels as kernels  # noqa: E402

OPCODES = ("SHFL", "MUFU", "FFMA", "FMUL", "FADD", "FSEL", "SEL", "PRMT", "SHF", "LDG", "STG", "REDG", "ATOMG",
           "MEMBAR", "BAR", "STS", "LDS")
VARIANTS = {  # per kernel: name -> options of `kernels.backward` or `kernels.forward`
    "backward": {
        "base": {},
        "four_rows": dict(four_row_sums=True),
        "atomic+four_rows": dict(atomic_cols=True, four_row_sums=True),
    },
    "forward": {
        "base": {},
    },
}


def triton_ir(kernel: str, options: dict) -> str:
    """The Triton IR (text) of one channel-major kernel at a small shape, lowered for CUDA sm_90."""
    captured = []
    lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    batch, seq, width, d_state = 1, 256, 16, 16
    S = jax.ShapeDtypeStruct  # noqa: N806
    row, col = S((batch, width, seq), jnp.bfloat16), S((batch, d_state, seq), jnp.bfloat16)
    common = (row, row, row, col, col, S((d_state, width), jnp.float32), S((1, width), jnp.float32),
              S((1, width), jnp.float32))
    shared = dict(chunk=32, softplus=True, has_z=True, interpret=False, channels_first=True)
    if kernel == "backward":
        chunk_states = S((batch, seq // 32, width, d_state), jnp.float32)
        args = (*common, chunk_states, row, S((batch, d_state, width), jnp.float32))
        fn = lambda *a: kernels.backward(*a, block_d=4, num_warps=1, **shared,  # noqa: E731
                                         **{"four_row_sums": False, **options})
    else:
        args = (*common, S((batch, d_state, width), jnp.float32))
        fn = lambda *a: kernels.forward(*a, block_d=16, num_warps=2, **shared, **options)  # noqa: E731
    gpu = types.SimpleNamespace(compute_capability="9.0")
    with (mock.patch.object(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: gpu),
          mock.patch.object(pallas_call_registration.lowering, "lower_jaxpr_to_triton_module", capture)):
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return captured[-1]


def sass_counts(ir_text: str, num_warps: int) -> tuple[int, collections.Counter]:
    """(registers, instruction counts by opcode) of the IR compiled by upstream Triton for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ir_text)
        compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=1))
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        cuobjdump = os.path.join(tools, "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass)
    return registers, collections.Counter(ops)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="backward", choices=("backward", "forward"))
    p.add_argument("--variants", default=None, help="options by name (default: all of the kernel's): backward "
                   + ", ".join(VARIANTS["backward"]) + "; forward " + ", ".join(VARIANTS["forward"]))
    args = p.parse_args()
    variants = VARIANTS[args.kernel]
    names = args.variants.split(",") if args.variants else list(variants)
    unknown = [name for name in names if name not in variants]
    if unknown:
        p.error(f"unknown {args.kernel} variants {unknown}; choose from {list(variants)}")
    print(f"upstream Triton for sm_90, {args.kernel} kernel, jax {jax.__version__}\n")
    print("| variant | registers | instructions | " + " | ".join(OPCODES) + " |")
    print("|---|---|---|" + "---|" * len(OPCODES))
    for name in names:
        registers, counts = sass_counts(triton_ir(args.kernel, variants[name]), 1 if args.kernel == "backward" else 2)
        print(f"| {name} | {registers} | {sum(counts.values())} | " + " | ".join(str(counts[op]) for op in OPCODES)
              + " |", flush=True)


if __name__ == "__main__":
    main()
