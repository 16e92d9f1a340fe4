"""Banded flash attention for Hopper GPUs in Pallas Mosaic GPU (TMA copies, wgmma, warp specialisation).

The maths and the band arithmetic are those of kernels.py (the Triton kernels): base-2 softmax,
the log-sum-exp saved for the backward, `_key_blocks`/`_query_blocks` for which blocks a tile
visits and which of them need no mask. What differs is how the work is laid out on the chip,
after FlashAttention-3 (and jax's `pallas/ops/gpu/attention_mgpu.py`, a dense/causal kernel):

- A CTA holds three warpgroups. Two compute warpgroups own 64 query rows each (the forward and
  dQ) or 64 key rows each (dK/dV); the third, the memory warpgroup, streams the tile's band of
  blocks from HBM into a ring of `stages` shared-memory slots with TMA, one barrier per slot and
  input to say "loaded", one per slot to say "both compute warpgroups are done with it".
- Both compute warpgroups walk the same blocks (the tile's band), so every barrier phase is
  waited on by both; each masks only the blocks on the edges of its own rows' band.
- Matmuls are wgmma with operands in (swizzled) shared memory or, for P and dS, in registers.
- Forward only: the two compute warpgroups take turns on the tensor cores (a "turn" barrier), so
  one's softmax overlaps the other's matmuls.

GQA: the forward and dQ read KV head h // group in place; dK/dV runs per KV head and loops over
the group's query heads itself (no (batch, seq, q_heads, d) dK/dV and no sum afterwards).
Needs bfloat16/float16, head_dim 64 or 128, and a sequence padded to a multiple of 128
(the caller pads; causality keeps real queries from the padded keys). The Mosaic GPU interpreter
of jax 0.11.2 cannot run wgmma, so on a CPU the tests only trace these kernels; their values and
gradients are tested on the GPU (tests/pallas_kernels/test_sliding_window_attention_mosaic.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.sliding_window_attention.kernels import (
    F32,
    LOG2E,
    _band_mask,
    _banded_loop,
    _key_blocks,
    _query_blocks,
)

WGS = 2  # compute warpgroups per CTA
ROWS = 64  # rows per compute warpgroup: one wgmma M tile
SEQ_MULTIPLE = WGS * ROWS  # the caller pads the sequence to this
_NEG = -1e30  # finite, so a row whose first blocks are all masked gets alpha = 0 later, not NaN


class MosaicTiles(NamedTuple):
    """Key rows per pipeline step of the forward and of dQ, query rows per step of dK/dV, and the
    depth of each kernel's shared-memory ring."""
    fwd_block_k: int = 128
    fwd_stages: int = 2
    dq_block_k: int = 64
    dq_stages: int = 3
    dkv_block_q: int = 64
    dkv_stages: int = 3

    def check(self):
        """Blocks of 64 or 128 rows (they must divide the 128-row padding), at least one stage."""
        for name, value in self._asdict().items():
            if name.endswith("stages") and value < 1 or name.endswith(("_k", "_q")) and value not in (64, 128):
                raise ValueError(f"MosaicTiles.{name} must be {'>= 1' if name.endswith('stages') else '64 or 128'}, "
                                 f"got {value}")
        return self


def _swizzled(shape, dtype):
    # 128-byte swizzle over (8, 64)-element tiles of a 16-bit dtype: what TMA and wgmma both read.
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def _rem(x, n):
    """x mod n for the non-negative int32 step counters (Python ints allowed)."""
    return lax.rem(jnp.asarray(x, jnp.int32), jnp.asarray(n, jnp.int32))


def _row(x, shape):
    return lax.broadcast_in_dim(x, shape, [0])


def _col(x, shape):
    return lax.broadcast_in_dim(x, shape, [1])


def _mask(q_start, k_start, shape, transposed, window, seq):
    """Visibility of a (rows, cols) block in the wgmma layout; rows are queries unless transposed."""
    rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    if transposed:
        q_pos, k_pos = q_start + cols, k_start + rows
    else:
        q_pos, k_pos = q_start + rows, k_start + cols
    return _band_mask(q_pos, k_pos, window, seq)


def _dot(a, b, shape, acc=None):
    """acc + a @ b on the tensor cores (a: registers or shared memory, b: shared memory)."""
    def run(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]
    if acc is None:
        return pl.run_scoped(run, plgpu.ACC(shape, F32))
    return pl.run_state(lambda ref: plgpu.wgmma(ref, a, b))(plgpu.ACC.init(acc))


def _producer(step_rows, sources, slots, ready, free, steps, stages):
    """Memory warpgroup: copy step i's block of each source (source.at[step_rows(i, n)]) into slot
    i % stages of slots[n], signalling ready[n]. Before reusing a slot it waits for free[n], the
    barrier both compute warpgroups arrive on when done with that source's slot; free[n] None means
    the source shares the barrier waited on just before it (each phase must be waited exactly once)."""
    plgpu.set_max_registers(40, action="decrease")

    def load(i, slot, n):
        plgpu.copy_gmem_to_smem(sources[n].at[step_rows(i, n)], slots[n].at[slot], ready[n].at[slot])

    for i in range(stages):
        @pl.when(i < steps)
        def _():
            for n in range(len(sources)):
                load(i, i, n)

    @pl.loop(0, jnp.maximum(steps - stages, 0))
    def _(i):
        slot = _rem(i, stages)
        for n in range(len(sources)):
            if free[n] is not None:
                plgpu.barrier_wait(free[n].at[slot])
            load(i + stages, slot, n)


def _launch(body, grid, name, *, out_type, scratch_types):
    """A kernel over grid (heads, padded seq, batch) in 128-row tiles: WGS compute warpgroups and a
    memory warpgroup ("wg" = WGS) per CTA; fast approximate exp2/log."""
    heads, padded, batch = grid
    return plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch_types,
        grid=(heads, padded // SEQ_MULTIPLE, batch), grid_names=("heads", "tiles", "batch"),
        num_threads=WGS + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True), kernel_name=name,
    )


def forward(q, k, v, *, window, seq, tiles: MosaicTiles):
    """q: (batch, padded, q_heads, d), k, v: (batch, padded, kv_heads, d), padded % 128 == 0.
    Returns o (q's layout and dtype) and the base-2 lse (batch, q_heads, padded) float32."""
    batch, padded, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    dtype, bk, stages = q.dtype, tiles.fwd_block_k, tiles.fwd_stages
    c = head_dim ** -0.5 * LOG2E

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, lse_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
             k_free, v_free, turn):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        tile_start = lax.axis_index("tiles") * SEQ_MULTIPLE
        first, last, _, _ = _key_blocks(tile_start, SEQ_MULTIPLE, bk, window, seq)

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_start = tile_start + wg * ROWS
            q_slot, lse_slot = qo_smem.at[wg], lse_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_start, ROWS), h], q_slot, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            _, _, full_first, full_last = _key_blocks(q_start, ROWS, bk, window, seq)

            def step(j, carry, masked):
                acc, m, l = carry  # unnormalised output, running max (base 2, scaled), normaliser
                i = j - first
                slot = _rem(i, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_slot, k_smem.at[slot].transpose((1, 0)))
                    take_turn()  # let the other warpgroup's matmuls go while this one waits
                    return acc_ref[...]
                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), F32))
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    # Scale, then mask: a row with no visible key here gets exp2(NEG - NEG) = 1, so a
                    # padded row that sees no key at all keeps l > 0 (masking before an FMA could
                    # leave l = 0, a NaN output row and, through delta, NaN in dK).
                    s = jnp.where(_mask(q_start, j * bk, s.shape, False, window, seq), s * c, _NEG)
                    m_new = jnp.maximum(m, s.max(axis=1))
                    p = jnp.exp2(s - _row(m_new, s.shape))
                else:
                    m_new = jnp.maximum(m, s.max(axis=1) * c)  # c > 0: max commutes with the scale
                    p = jnp.exp2(s * c - _row(m_new, s.shape))  # one FMA and an exp2 per logit
                alpha = jnp.exp2(m - m_new)
                acc *= _row(alpha, acc.shape)
                l = l * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                # Keep the softmax above the barriers (the order changes the speed a lot, as in FA3).
                acc, l, m_new, p16 = lax.optimization_barrier((acc, l, m_new, p16))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(j + 1 < last)
                    def _():
                        plgpu.barrier_wait(k_ready.at[_rem(i + 1, stages)])
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            acc = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), F32), plgpu.Layout.WGMMA)
            m = plgpu.layout_cast(jnp.full((ROWS,), -jnp.inf, F32), plgpu.Layout.WGMMA.reduce(1))
            l = plgpu.layout_cast(jnp.zeros((ROWS,), F32), plgpu.Layout.WGMMA.reduce(1))
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first
            acc, m, l = _banded_loop(first, last, full_first, full_last, step, (acc, m, l))
            pl.when(wg == 0)(take_turn)
            q_slot[...] = (acc / _row(l, acc.shape)).astype(dtype)
            lse_slot[...] = m + jnp.log(l) * LOG2E  # log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_slot, o_ref.at[b, pl.ds(q_start, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_slot, lse_ref.at[b, h, pl.ds(q_start, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == WGS)
        def _memory():
            rows = lambda i, n: (b, pl.ds((first + i) * bk, bk), h // group)  # noqa: E731
            _producer(rows, (k_ref, v_ref), (k_smem, v_smem), (k_ready, v_ready), (k_free, v_free), last - first,
                      stages)

    return _launch(
        body, (q_heads, padded, batch), "swa_mosaic_fwd",
        out_type=[jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((batch, q_heads, padded), F32)],
        scratch_types=[
            _swizzled((WGS, ROWS, head_dim), dtype), plgpu.SMEM((WGS, ROWS), F32),
            _swizzled((stages, bk, head_dim), dtype), _swizzled((stages, bk, head_dim), dtype),
            plgpu.Barrier(num_barriers=WGS), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=WGS, num_barriers=stages), plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=WGS),
        ],
    )(q, k, v)


def _dq(q, k, v, do, lse, delta, *, window, seq, tiles: MosaicTiles):
    """dQ: a CTA per (query head, 128-query tile, batch), streaming the tile's band of K/V blocks."""
    batch, padded, q_heads, head_dim = q.shape
    group = q_heads // k.shape[2]
    dtype, bk, stages = q.dtype, tiles.dq_block_k, tiles.dq_stages
    scale = head_dim ** -0.5
    c = scale * LOG2E

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem, do_smem, lse_smem, delta_smem,
             k_smem, v_smem, own_ready, k_ready, v_ready, free):
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        tile_start = lax.axis_index("tiles") * SEQ_MULTIPLE
        first, last, _, _ = _key_blocks(tile_start, SEQ_MULTIPLE, bk, window, seq)

        @pl.when(wg < WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_start = tile_start + wg * ROWS
            rows = (b, pl.ds(q_start, ROWS), h)
            slots = (q_smem.at[wg], do_smem.at[wg], lse_smem.at[wg], delta_smem.at[wg])
            sources = (q_ref.at[rows], do_ref.at[rows], lse_ref.at[b, h, pl.ds(q_start, ROWS)],
                       delta_ref.at[b, h, pl.ds(q_start, ROWS)])
            for n, (source, slot) in enumerate(zip(sources, slots)):
                plgpu.copy_gmem_to_smem(source, slot, own_ready.at[n * WGS + wg])
            for n in range(len(sources)):
                plgpu.barrier_wait(own_ready.at[n * WGS + wg])
            q_slot, do_slot = slots[:2]
            row_lse = plgpu.load(slots[2], layout=plgpu.Layout.WGMMA.reduce(1))
            row_delta = plgpu.load(slots[3], layout=plgpu.Layout.WGMMA.reduce(1))
            _, _, full_first, full_last = _key_blocks(q_start, ROWS, bk, window, seq)

            def step(j, dq, masked):
                slot = _rem(j - first, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                s = _dot(q_slot, k_smem.at[slot].transpose((1, 0)), (ROWS, bk))
                p = jnp.exp2(s * c - _row(row_lse, s.shape))
                if masked:
                    p = jnp.where(_mask(q_start, j * bk, s.shape, False, window, seq), p, 0.0)
                plgpu.barrier_wait(v_ready.at[slot])
                dp = _dot(do_slot, v_smem.at[slot].transpose((1, 0)), (ROWS, bk))
                ds = p * (dp - _row(row_delta, dp.shape))
                dq = _dot(ds.astype(dtype), k_smem.at[slot], None, dq)
                plgpu.barrier_arrive(free.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), F32), plgpu.Layout.WGMMA)
            dq = _banded_loop(first, last, full_first, full_last, step, dq)
            q_slot[...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_slot, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == WGS)
        def _memory():
            rows = lambda i, n: (b, pl.ds((first + i) * bk, bk), h // group)  # noqa: E731
            _producer(rows, (k_ref, v_ref), (k_smem, v_smem), (k_ready, v_ready), (free, None), last - first, stages)

    return _launch(
        body, (q_heads, padded, batch), "swa_mosaic_dq",
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[
            _swizzled((WGS, ROWS, head_dim), dtype), _swizzled((WGS, ROWS, head_dim), dtype),
            plgpu.SMEM((WGS, ROWS), F32), plgpu.SMEM((WGS, ROWS), F32),
            _swizzled((stages, bk, head_dim), dtype), _swizzled((stages, bk, head_dim), dtype),
            plgpu.Barrier(num_barriers=4 * WGS), plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
        ],
    )(q, k, v, do, lse, delta)


def _dkv(q, k, v, do, lse, delta, *, window, seq, tiles: MosaicTiles):
    """dK, dV: a CTA per (KV head, 128-key tile, batch); the memory warpgroup streams, for each of
    the group's query heads in turn, the query blocks that see the tile (Q, dO, lse, delta)."""
    batch, padded, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    dtype, bq, stages = q.dtype, tiles.dkv_block_q, tiles.dkv_stages
    scale = head_dim ** -0.5
    c = scale * LOG2E
    num_q_blocks = padded // bq

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem, v_smem, q_smem, do_smem,
             lse_smem, delta_smem, own_ready, q_ready, do_ready, lse_ready, delta_ready, free):
        b, hk, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        tile_start = lax.axis_index("tiles") * SEQ_MULTIPLE
        first, last, _, _ = _query_blocks(tile_start, bq, SEQ_MULTIPLE, window, seq, num_q_blocks)
        per_head = last - first

        @pl.when(wg < WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            k_start = tile_start + wg * ROWS
            rows = (b, pl.ds(k_start, ROWS), hk)
            k_slot, v_slot = k_smem.at[wg], v_smem.at[wg]
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_slot, own_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_slot, own_ready.at[WGS + wg])
            plgpu.barrier_wait(own_ready.at[wg])
            plgpu.barrier_wait(own_ready.at[WGS + wg])
            _, _, full_first, full_last = _query_blocks(k_start, bq, ROWS, window, seq, num_q_blocks)

            def over_heads(g, carry):
                def step(j, carry, masked):
                    dk, dv = carry
                    slot = _rem(g * per_head + j - first, stages)
                    plgpu.barrier_wait(q_ready.at[slot])
                    plgpu.barrier_wait(lse_ready.at[slot])
                    s_t = _dot(k_slot, q_smem.at[slot].transpose((1, 0)), (ROWS, bq))  # (keys, queries)
                    lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    p_t = jnp.exp2(s_t * c - _col(lse, s_t.shape))
                    if masked:
                        p_t = jnp.where(_mask(j * bq, k_start, s_t.shape, True, window, seq), p_t, 0.0)
                    plgpu.barrier_wait(do_ready.at[slot])
                    plgpu.barrier_wait(delta_ready.at[slot])
                    dv = _dot(p_t.astype(dtype), do_smem.at[slot], None, dv)
                    dp_t = _dot(v_slot, do_smem.at[slot].transpose((1, 0)), (ROWS, bq))
                    delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    ds_t = p_t * (dp_t - _col(delta, dp_t.shape))
                    dk = _dot(ds_t.astype(dtype), q_smem.at[slot], None, dk)
                    plgpu.barrier_arrive(free.at[slot])
                    return dk, dv

                return _banded_loop(first, last, full_first, full_last, step, carry)

            zeros = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), F32), plgpu.Layout.WGMMA)
            dk, dv = lax.fori_loop(0, group, over_heads, (zeros, zeros))
            k_slot[...] = (dk * scale).astype(dtype)
            v_slot[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_slot, dk_ref.at[rows], commit_group=False)
            plgpu.copy_smem_to_gmem(v_slot, dv_ref.at[rows], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == WGS)
        def _memory():
            def rows(i, n):
                head = hk * group + lax.div(jnp.asarray(i, jnp.int32), per_head)
                start = (first + _rem(i, per_head)) * bq
                return (b, pl.ds(start, bq), head) if n < 2 else (b, head, pl.ds(start, bq))
            _producer(rows, (q_ref, do_ref, lse_ref, delta_ref), (q_smem, do_smem, lse_smem, delta_smem),
                      (q_ready, do_ready, lse_ready, delta_ready), (free, None, None, None), group * per_head, stages)

    shape = jax.ShapeDtypeStruct(k.shape, dtype)
    return _launch(
        body, (kv_heads, padded, batch), "swa_mosaic_dkv",
        out_type=[shape, shape],
        scratch_types=[
            _swizzled((WGS, ROWS, head_dim), dtype), _swizzled((WGS, ROWS, head_dim), dtype),
            _swizzled((stages, bq, head_dim), dtype), _swizzled((stages, bq, head_dim), dtype),
            plgpu.SMEM((stages, bq), F32), plgpu.SMEM((stages, bq), F32),
            plgpu.Barrier(num_barriers=2 * WGS),
            *(plgpu.Barrier(num_barriers=stages) for _ in range(4)),
            plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
        ],
    )(q, k, v, do, lse, delta)


def backward(q, k, v, o, lse, do, *, window, seq, tiles: MosaicTiles):
    """Gradients dq, dk, dv in the inputs' layouts (inputs padded as for `forward`)."""
    delta = jnp.sum(do.astype(F32) * o.astype(F32), axis=-1).swapaxes(1, 2)  # (batch, q_heads, padded)
    dk, dv = _dkv(q, k, v, do, lse, delta, window=window, seq=seq, tiles=tiles)
    dq = _dq(q, k, v, do, lse, delta, window=window, seq=seq, tiles=tiles)
    return dq, dk, dv
