"""The Mosaic GPU sliding-window attention kernels against the dense reference, values and all
gradients, on a Hopper GPU (`JAX_PLATFORMS=cuda python -m pytest tests/pallas_kernels`). jax 0.11.2's
Mosaic GPU interpreter cannot run wgmma, so on a CPU only the tracing test runs (the Triton kernels,
which share the band arithmetic, run in interpret mode in tests/ops)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sliding_window_attention import mosaic_kernels
from pallas_kernels.sliding_window_attention import sliding_window_attention as pallas_attention
from pallas_kernels.sliding_window_attention.sliding_window_attention import mosaic_supports
from samba_jax.ops.attention import sliding_window_attention

_HOPPER = mosaic_supports(jnp.zeros((1, 1, 1, 64), jnp.bfloat16))
on_hopper = pytest.mark.skipif(not _HOPPER, reason="Mosaic GPU kernels need a Hopper GPU (run on the device)")


@pytest.mark.parametrize("seq,window,group", [(256, 17, 2), (384, 300, 1), (1024, 200, 4)])
def test_mosaic_kernels_trace_on_any_backend(seq, window, group):
    # Runs in CI on a CPU: builds the three kernels' jaxprs (band bounds, barriers, wgmma shapes),
    # so a Python-level break in mosaic_kernels.py fails here, not first on the GPU.
    q = jax.ShapeDtypeStruct((2, seq, 2 * group, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, seq, 2, 128), jnp.bfloat16)
    lse = jax.ShapeDtypeStruct((2, 2 * group, seq), jnp.float32)
    opts = dict(window=window, seq=seq - 5, tiles=mosaic_kernels.MosaicTiles())
    fwd = jax.make_jaxpr(lambda q, k, v: mosaic_kernels.forward(q, k, v, **opts))(q, kv, kv)
    assert [x.shape for x in fwd.out_avals] == [q.shape, lse.shape]
    bwd = jax.make_jaxpr(lambda *a: mosaic_kernels.backward(*a, **opts))(q, kv, kv, q, lse, q)
    assert [x.shape for x in bwd.out_avals] == [q.shape, kv.shape, kv.shape]


def _inputs(seed, batch, seq, q_heads, kv_heads, head_dim, dtype):
    rng = np.random.default_rng(seed)
    shapes = [(batch, seq, q_heads, head_dim), (batch, seq, kv_heads, head_dim), (batch, seq, kv_heads, head_dim),
              (batch, seq, q_heads, head_dim)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


@functools.partial(jax.jit, static_argnames=("window", "mosaic"))
def _out_and_grads(q, k, v, ct, window, mosaic):
    if mosaic:
        fn = lambda q, k, v: pallas_attention(q, k, v, window, backend="mosaic")  # noqa: E731
    else:
        fn = lambda q, k, v: sliding_window_attention(q, k, v, window, implementation="reference")  # noqa: E731
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(ct)


# (seq, q_heads, kv_heads, head_dim, window): lengths not multiples of the 128-row tiles, windows
# 1, inside one block, one block, across blocks, seq - 1, seq; GQA 1, 2, 4; head_dim 64 and 128.
CASES = [
    (1, 4, 2, 128, 1), (7, 4, 2, 128, 3), (129, 4, 2, 128, 17), (129, 2, 2, 128, 129), (300, 4, 1, 64, 1),
    (300, 4, 4, 128, 128), (1000, 4, 1, 128, 200), (1000, 8, 2, 128, 999), (1000, 4, 2, 64, 1000),
    (2500, 4, 2, 128, 700), (777, 2, 1, 64, 300),
]


@on_hopper
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("seq,q_heads,kv_heads,head_dim,window", CASES)
def test_mosaic_matches_reference_values_and_grads(seq, q_heads, kv_heads, head_dim, window, dtype):
    q, k, v, ct = _inputs(seq + window, 2, seq, q_heads, kv_heads, head_dim, dtype)
    out_m, grads_m = _out_and_grads(q, k, v, ct, window, True)
    out_r, grads_r = _out_and_grads(*(x.astype(jnp.float32) for x in (q, k, v, ct)), window, False)
    assert out_m.dtype == dtype and out_m.shape == q.shape
    tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
    np.testing.assert_allclose(out_m.astype(jnp.float32), out_r, rtol=0, atol=tol)
    for name, gm, gr in zip("qkv", grads_m, grads_r):
        scale = float(jnp.abs(gr).max())
        np.testing.assert_allclose(gm.astype(jnp.float32), gr, rtol=0, atol=tol * max(scale, 1), err_msg=name)


@on_hopper
def test_mosaic_is_the_pallas_default_on_hopper_and_catches_a_wrong_window():
    # The op's "pallas" takes the Mosaic kernels here; a window off by one must fail the comparison
    # (the gradient check above can fail).
    q, k, v, ct = _inputs(0, 1, 600, 4, 2, 128, jnp.bfloat16)
    out_op = sliding_window_attention(q, k, v, 100, implementation="pallas")
    out_m, _ = _out_and_grads(q, k, v, ct, 100, True)
    np.testing.assert_array_equal(np.asarray(out_op, np.float32), np.asarray(out_m, np.float32))
    out_r, _ = _out_and_grads(*(x.astype(jnp.float32) for x in (q, k, v, ct)), 101, False)
    assert float(jnp.abs(out_m.astype(jnp.float32) - out_r).max()) > 0.05


def test_mosaic_rejects_float32_by_name():
    # float32 is refused on every backend (on a CPU for want of a GPU as well), naming the alternative.
    q = jnp.zeros((1, 128, 2, 128), jnp.float32)
    with pytest.raises(ValueError, match="head_dim 64 or 128.*backend='triton'"):
        pallas_attention(q, q, q, 16, backend="mosaic")
    with pytest.raises(ValueError, match="head_dim 64 or 128"):  # MosaicTiles alone select the Mosaic backend
        pallas_attention(q, q, q, 16, tiles=mosaic_kernels.MosaicTiles())


def test_triton_rejects_mosaic_tiles_by_name():
    q = jnp.zeros((1, 128, 2, 16), jnp.float32)
    with pytest.raises(ValueError, match="kernels.Tiles"):
        pallas_attention(q, q, q, 16, backend="triton", tiles=mosaic_kernels.MosaicTiles())


@pytest.mark.parametrize("field,value", [("fwd_block_k", 256), ("dq_block_k", 32), ("dkv_stages", 0)])
def test_mosaic_tiles_outside_the_supported_set_are_named(field, value):
    with pytest.raises(ValueError, match=f"MosaicTiles.{field}"):
        mosaic_kernels.MosaicTiles(**{field: value}).check()
    assert mosaic_kernels.MosaicTiles().check() == mosaic_kernels.MosaicTiles()


def _visible(seq, padded, window):
    q = np.arange(padded)[:, None]
    k = np.arange(padded)[None, :]
    return (k <= q) & (k > q - window) & (k < seq)  # (query, key), as kernels._band_mask


@pytest.mark.parametrize("seq,window", [(1, 1), (7, 3), (129, 17), (300, 64), (300, 300), (1000, 128), (1000, 200),
                                        (700, 1)])
@pytest.mark.parametrize("block", [64, 128])
def test_band_bounds_of_each_tile_cover_every_visible_pair_and_skip_masks_only_on_whole_blocks(seq, window, block):
    # The Mosaic kernels take a tile's block range from the 128-row tile and each warpgroup's
    # unmasked range from its own 64 rows (kernels._key_blocks/_query_blocks, clipped as in
    # _banded_loop). Brute force: no visible pair outside the range, no masked pair inside the
    # unmasked part. (On the GPU a violation is wrong values; here it fails on a CPU.)
    from pallas_kernels.sliding_window_attention.kernels import _key_blocks, _query_blocks

    tile, rows = mosaic_kernels.SEQ_MULTIPLE, mosaic_kernels.ROWS
    padded = tile * -(-seq // tile)
    vis = _visible(seq, padded, window)
    for transposed in (False, True):  # forward/dQ (query rows, key blocks); dK/dV (key rows, query blocks)
        grid = vis.T if transposed else vis
        for start in range(0, padded, tile):
            if transposed:
                first, last = (int(x) for x in _query_blocks(start, block, tile, window, seq, padded // block)[:2])
            else:
                first, last = (int(x) for x in _key_blocks(start, tile, block, window, seq)[:2])
            outside = np.ones(padded // block, bool)
            outside[first:last] = False
            assert not grid[start:start + tile].reshape(tile, -1, block)[:, outside].any()
            for r0 in (start, start + rows):
                if transposed:
                    lo, hi = (int(x) for x in _query_blocks(r0, block, rows, window, seq, padded // block)[2:])
                else:
                    lo, hi = (int(x) for x in _key_blocks(r0, rows, block, window, seq)[2:])
                lo = min(max(lo, first), last)
                hi = min(max(hi, lo), last)
                assert grid[r0:r0 + rows, lo * block:hi * block].all()
