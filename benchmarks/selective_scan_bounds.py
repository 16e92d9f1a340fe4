"""What bounds the channel-major selective-scan kernels: time them with one piece of work taken out.

    python benchmarks/selective_scan_bounds.py --shape=4x4096x4096 --dtype=bfloat16

No profiler reads hardware counters on every lent GPU, so this places time inside the kernels by
difference: each variant re-traces the kernels of `triton_channel_major_kernels` with one stage
replaced by something of (nearly) no cost that keeps the data flowing (so nothing is dead code), and
times the three calls of a training step's scan: the forward-only call (prefill tiles), the forward
with the training tiles, and forward+backward. Variants change every kernel at once:

  as_is        the kernels as they are
  bc_f32       B and C cast to float32 before the kernels (a candidate, not an ablation: the kernels
               then load 4-byte values per state and step instead of unpacking bfloat16 ones)
  no_exp       exp2(x) -> 1 + x (one FMA instead of the special-function unit)
  no_scan      the tile's linear recurrence -> a * b (no scan, no shuffles)
  no_reverse   the backward's reverse-time scans run forward in time instead (Triton lowers a reverse
               scan with its inputs and outputs flipped across lanes; this leaves the flips out)
  row_store_converted  the backward's dB, dC partial-sum rows stored as (1, chunk) rows, which Triton
               converts to another layout through shared memory first (the kernel before 2026-12-06;
               not an ablation; with the atomic default, tuning bwd_atomic_cols=1, the same as
               butterfly_sums)
  butterfly_sums  the backward's dB, dC summed over channels state by state by Triton's butterfly
               even where the default takes four states at a time (`channel_sums`; not an ablation)
  no_col_sums  the backward's dB, dC (per step, summed over the block's channels) never stored, so
               their reductions across channels are dead code
  no_bc_loads  B and C rows -> values made from the step index (no loads)
  no_carry     the state carried between tiles -> zero (no column extraction)
  state_loop_only  no_exp, no_scan, no_bc_loads and no_carry at once: what is left is the loads of u,
               delta, z, the stores, the masks and the loop over states

Outputs of the ablations are wrong by construction (bc_f32's, row_store_converted's and butterfly_sums'
must equal as_is's, the last up to float32 rounding); each variant's
difference from as_is is printed (an ablation whose outputs equal as_is's did not take).
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
from pallas_kernels.selective_scan.linear_recurrence import linear_recurrence  # noqa: E402

fused = importlib.import_module("pallas_kernels.selective_scan.selective_scan")  # the module, not its function

F32 = jnp.float32


class _Numpy:
    """jnp with exp2 swapped: the kernels reach exp2 only through their module's `jnp`."""

    def __init__(self, exp2):
        self.exp2 = exp2

    def __getattr__(self, name):
        return getattr(jnp, name)


def _float32_columns(kernel):
    """kernel(u, delta, z, bt, ct, ...) with B^T, C^T cast to float32 first."""

    def call(u, delta, z, bt, ct, *rest, **options):
        return kernel(u, delta, z, bt.astype(F32), ct.astype(F32), *rest, **options)

    return call


_STORE_COL = tcm._store_col  # the kernels' own, for the atomic case below


def _row_store_converted(ref, n, tile, values, valid, atomic):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    if atomic:  # the atomic adds (the default since 2026-12-07) take (1, chunk) rows already
        return _STORE_COL(ref, n, tile, values, valid, atomic)
    pltriton.store(ref.at[pl.ds(n, 1), pl.ds(tile.start, values.shape[1])], values, mask=valid)


def _no_bc_loads(self, ref, n):
    return self.step.astype(F32) * (1.0 / 64) + n * 0.01


def _no_carry(self, x, j):
    return jnp.zeros((x.shape[0], 1), F32)


PATCHES = {
    "as_is": [],
    "bc_f32": [("forward", _float32_columns(tcm.forward)), ("backward", _float32_columns(tcm.backward))],
    "no_exp": [("jnp", _Numpy(lambda x: 1.0 + x))],
    "no_scan": [("linear_recurrence", lambda a, b, axis, reverse=False: a * b)],
    "no_reverse": [("linear_recurrence", lambda a, b, axis, reverse=False: linear_recurrence(a, b, axis))],
    "row_store_converted": [("_store_col", _row_store_converted), ("channel_sums.applies", lambda *args: False)],
    "butterfly_sums": [("channel_sums.applies", lambda *args: False)],
    "no_col_sums": [("_store_col", lambda *args: None), ("_four_rows", lambda *args: None)],
    "no_bc_loads": [("_Tile.broadcast", _no_bc_loads)],
    "no_carry": [("_Tile.column", _no_carry)],
}
PATCHES["state_loop_only"] = [p for name in ("no_exp", "no_scan", "no_bc_loads", "no_carry") for p in PATCHES[name]]


def _relative_difference(x, y):
    """max |x - y| / max |y|, infinite where x holds a NaN that y does not (an unwritten output)."""
    x, y = x.astype(F32), y.astype(F32)
    diff = jnp.where(jnp.isnan(x) != jnp.isnan(y), jnp.inf, jnp.abs(x - y))
    return float(jnp.nanmax(diff) / (jnp.nanmax(jnp.abs(y)) + 1e-30))


@contextlib.contextmanager
def patched(variant):
    with contextlib.ExitStack() as stack:
        for target, value in PATCHES[variant]:
            owner, _, attr = target.rpartition(".")
            owner = getattr(tcm, owner) if owner else tcm  # tcm._Tile, tcm.channel_sums or tcm itself
            stack.enter_context(mock.patch.object(owner, attr, value))
        yield


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4x4096x4096")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--d_state", type=int, default=16, help="SSM states (Mamba's 16; the CPU test takes 8)")
    p.add_argument("--variants", default=",".join(PATCHES))
    p.add_argument("--iters", type=int, default=20, help="0: no timing, only the differences (the CPU test)")
    args = p.parse_args()
    variants = args.variants.split(",")
    batch, seq, width = (int(x) for x in args.shape.split("x"))
    a = inputs(batch, seq, width, jnp.dtype(args.dtype), d_state=args.d_state, layout="channels_first")
    exp_floor_ms = batch * seq * width * args.d_state / EXP_PER_S * 1e3
    tile = fused.CHANNEL_MAJOR_TILE
    knobs = fused.default_channel_major_tuning(batch, seq, width, tile, jnp.dtype(args.dtype).itemsize)
    training_tiles = dict(fwd_only_block_d=knobs["fwd_block_d"], fwd_only_chunk=tile,
                          fwd_only_warps=knobs["fwd_warps"])

    def calls(tuning):
        scan = lambda a: fused.selective_scan(**a, delta_softplus=True, layout="channels_first",  # noqa: E731
                                              tuning=tuning)
        return jax.jit(scan), jax.jit(jax.grad(lambda a: jnp.sum(scan(a).astype(F32))))

    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.shape} {args.dtype} d_state {args.d_state} "
          f"channels-first; exponentials alone at the special-function rate: {exp_floor_ms:.2f} ms per pass\n")
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
        times = [median_ms(f, a, iters=args.iters) for f in compiled] if args.iters else None
        out = [compiled[0](a), compiled[2](a)]  # y, and all gradients
        reference = out if reference is None else reference
        err = max(_relative_difference(x, y) for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
        # bc_f32, row_store_converted, butterfly_sums must agree with as_is; an ablation must
        # differ, or its patch did not take.
        print(f"<!-- {variant}: max relative difference from as_is over y and all gradients {err:.2e} -->")
        cells = [f"{t:.2f}" for t in (*times, times[2] - times[1])] if times else ["-"] * 4
        print(f"| {variant} | {' | '.join(cells)} |", flush=True)

if __name__ == "__main__":
    main()
