"""What bounds the channel-major selective-scan kernels: time them with one piece of work taken out.

    python benchmarks/selective_scan_bounds.py --shape=4x4096x4096 --dtype=bfloat16

No profiler reads hardware counters on every lent GPU, so this places time inside the kernels by
difference: each variant re-traces the kernels of `triton_channel_major_kernels` with one stage
replaced by something of (nearly) no cost that keeps the data flowing (so nothing is dead code), and
times the three calls of a training step's scan: the forward-only call (prefill tiles), the forward
with the training tiles, and forward+backward. Variants change every kernel at once:

  as_is        the kernels as they are
  ex2_ftz      exp2 as one `ex2.approx.ftz.f32` instruction (inline PTX) instead of libdevice's exp2f
  no_exp       exp2(x) -> 1 + x (one FMA instead of the special-function unit)
  no_scan      the tile's linear recurrence -> a * b (no scan, no shuffles)
  no_bc_loads  B and C rows -> values made from the step index (no loads)
  no_carry     the state carried between tiles -> zero (no column extraction)
  state_loop_only  all of the above at once: what is left is the loads, stores and the loop over states

Outputs of the variants are wrong by construction, except ex2_ftz's; each one's difference from
as_is is printed (a variant whose outputs equal as_is's did not take).
Times are medians of --iters calls (benchmarks/timing.py), all in one process, on one GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.selective_scan import EXP_PER_S, inputs  # noqa: E402
from benchmarks.timing import median_ms  # noqa: E402
from pallas_kernels.selective_scan import triton_channel_major_kernels as tcm  # noqa: E402

fused = importlib.import_module("pallas_kernels.selective_scan.selective_scan")  # the module, not its function

F32 = jnp.float32


def _ex2_ftz(x):
    from jax.experimental.pallas import triton as pltriton

    return pltriton.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, F32)])[0]


class _Numpy:
    """jnp with exp2 swapped: the kernels reach exp2 only through their module's `jnp`."""

    def __init__(self, exp2):
        self.exp2 = exp2

    def __getattr__(self, name):
        return getattr(jnp, name)


def _no_bc_loads(self, ref, n):
    return self.step.astype(F32) * (1.0 / 64) + n * 0.01


def _no_carry(self, x, j):
    return jnp.zeros((x.shape[0], 1), F32)


PATCHES = {
    "as_is": [],
    "ex2_ftz": [("jnp", _Numpy(_ex2_ftz))],
    "no_exp": [("jnp", _Numpy(lambda x: 1.0 + x))],
    "no_scan": [("linear_recurrence", lambda a, b, axis, reverse=False: a * b)],
    "no_bc_loads": [("_Tile.broadcast", _no_bc_loads)],
    "no_carry": [("_Tile.column", _no_carry)],
}
PATCHES["state_loop_only"] = [p for name in ("no_exp", "no_scan", "no_bc_loads", "no_carry") for p in PATCHES[name]]


@contextlib.contextmanager
def patched(variant):
    with contextlib.ExitStack() as stack:
        for target, value in PATCHES[variant]:
            owner, attr = (tcm._Tile, target.split(".")[1]) if target.startswith("_Tile.") else (tcm, target)
            stack.enter_context(mock.patch.object(owner, attr, value))
        yield


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4x4096x4096")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default=",".join(PATCHES))
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    variants = args.variants.split(",")
    if jax.default_backend() != "gpu" and "ex2_ftz" in variants:  # inline PTX has no interpret mode
        print("ex2_ftz left out: inline PTX runs only on an NVIDIA GPU")
        variants.remove("ex2_ftz")
    batch, seq, width = (int(x) for x in args.shape.split("x"))
    a = inputs(batch, seq, width, jnp.dtype(args.dtype), layout="channels_first")
    exp_floor_ms = batch * seq * width * 16 / EXP_PER_S * 1e3
    knobs = fused.default_channel_major_tuning(batch, seq, width, 32, jnp.dtype(args.dtype).itemsize)
    training_tiles = dict(fwd_only_block_d=knobs["fwd_block_d"], fwd_only_chunk=32,
                          fwd_only_warps=knobs["fwd_warps"])

    def calls(tuning):
        scan = lambda a: fused.selective_scan(**a, delta_softplus=True, layout="channels_first",  # noqa: E731
                                              tuning=tuning)
        return jax.jit(scan), jax.jit(jax.grad(lambda a: jnp.sum(scan(a).astype(F32))))

    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.shape} {args.dtype} channels-first; "
          f"exponentials alone at the special-function rate: {exp_floor_ms:.2f} ms per pass\n")
    print("| variant | fwd-only tiles ms | training fwd ms | fwd+bwd ms | bwd (f+b - training fwd) ms |")
    print("|---|---|---|---|---|")
    reference, lowered = None, {}
    for variant in variants:  # trace under each patch; the lowered programs keep it
        jax.clear_caches()
        with patched(variant):
            fwd_only, grad = calls(None)
            fwd_train, _ = calls(training_tiles)
            lowered[variant] = [f.lower(a) for f in (fwd_only, fwd_train, grad)]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # compiling is most of the run time
        compiling = {v: [pool.submit(x.compile) for x in xs] for v, xs in lowered.items()}
        programs = {v: [f.result() for f in futures] for v, futures in compiling.items()}
    for variant, compiled in programs.items():  # timed after every compile has finished
        times = [median_ms(f, a, iters=args.iters) for f in compiled]
        out = [compiled[0](a), compiled[2](a)]  # y, and all gradients
        reference = out if reference is None else reference
        err = max(float(jnp.max(jnp.abs(x.astype(F32) - y.astype(F32))) / (jnp.max(jnp.abs(y.astype(F32))) + 1e-30))
                  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
        # as_is and ex2_ftz must agree (to rounding); every other variant must differ, or its patch did nothing.
        print(f"<!-- {variant}: max relative difference from as_is over y and all gradients {err:.2e} -->")
        print(f"| {variant} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} | {times[2] - times[1]:.2f} |",
              flush=True)

if __name__ == "__main__":
    main()
