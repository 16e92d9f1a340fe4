"""The Pallas sliding-window attention: padding, defaults and the custom VJP around the kernels.

Semantics of `samba_jax.ops.sliding_window_attention`: query i sees keys i - window < j <= i,
softmax scale 1/sqrt(head_dim), GQA with kv_heads dividing q_heads. Two backends: "triton"
(kernels.py; any power-of-two head_dim, float32 too; Pallas interpret mode on a CPU backend, for
tests) and "mosaic" (mosaic_kernels.py; Hopper GPUs, bfloat16/float16, head_dim 64 or 128).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sliding_window_attention import kernels


def _module(options):
    if options.backend == "mosaic":
        from pallas_kernels.sliding_window_attention import mosaic_kernels  # needs jax's Mosaic GPU

        return mosaic_kernels
    return kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, options):
    return _module(options).forward(q, k, v, **options.kw)[0]


def _attention_fwd(q, k, v, options):
    o, lse = _module(options).forward(q, k, v, **options.kw)
    return o, (q, k, v, o, lse)


def _attention_bwd(options, residuals, do):
    q, k, v, o, lse = residuals
    return _module(options).backward(q, k, v, o, lse, do, **options.kw)


_attention.defvjp(_attention_fwd, _attention_bwd)


class _Options:
    """Static kernel options (hashable, for custom_vjp's non-differentiable argument)."""

    def __init__(self, backend, **kw):
        self.backend, self.kw = backend, kw

    def _key(self):
        return self.backend, tuple(sorted(self.kw.items()))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Options) and self._key() == other._key()


def mosaic_supports(q) -> bool:
    """Whether the Mosaic GPU kernels take these inputs: a Hopper-class NVIDIA GPU (wgmma, TMA),
    bfloat16/float16, head_dim 64 or 128 (wider heads overflow the kernels' shared-memory rings)."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] not in (64, 128):
        return False
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return float(capability) >= 9.0


def default_tiles(seq: int, head_dim: int) -> kernels.Tiles:
    """The tiles `sliding_window_attention` uses unless told otherwise.

    From the H200 sweep in benchmarks/HISTORY.md (head_dim 128, seq 8192, window 2048): forward 64 x 64 on
    4 warps, 3 stages; dK/dV 128 query x 64 key rows on 8 warps, 2 stages (3 overflow shared memory);
    dQ 128 x 64 on 8 warps, 3 stages. Wider heads keep the untuned 64 x 64 / 8 warps / 2 stages
    everywhere (shared memory), short sequences (< 128) blocks of 64 or 16.
    """
    if seq < 128 or head_dim > 128:
        block = 64 if seq >= 64 else 16
        tile = kernels.Tile(block, block, 4 if head_dim <= 64 else 8, 2)
        return kernels.Tiles(tile, tile, tile)
    return kernels.Tiles(fwd=kernels.Tile(64, 64, 4, 3), dkv=kernels.Tile(128, 64, 8, 2),
                         dq=kernels.Tile(128, 64, 8, 3))


def sliding_window_attention(q, k, v, window: int, *, block_q: int | None = None, block_k: int | None = None,
                             num_warps: int | None = None, tiles=None, interpret: bool | None = None,
                             backend: str | None = None):
    """q: (batch, seq, q_heads, head_dim); k, v: (batch, seq, kv_heads, head_dim); window in [1, seq].

    backend: "mosaic", "triton" or None (Mosaic GPU where `mosaic_supports` the inputs and no Triton
    tuning is given, else Triton). tiles: a `kernels.Tiles` (Triton: each kernel's blocks, warps and
    stages, default `default_tiles`; block_q, block_k, num_warps override all three kernels) or a
    `mosaic_kernels.MosaicTiles`. Triton needs a power-of-two head_dim. Returns q's shape and dtype.
    """
    batch, seq, q_heads, head_dim = q.shape
    triton_tuning = any((block_q, block_k, num_warps, interpret)) or isinstance(tiles, kernels.Tiles)
    if backend is None:
        mosaic_tiles = tiles is not None and not isinstance(tiles, kernels.Tiles)
        backend = "mosaic" if mosaic_tiles or (mosaic_supports(q) and not triton_tuning) else "triton"
    if backend == "mosaic":
        if not mosaic_supports(q):
            raise ValueError(f"backend='mosaic' needs a Hopper GPU, bfloat16/float16 inputs and head_dim 64 or 128; "
                             f"got {q.dtype}, head_dim {head_dim} on {jax.default_backend()}; use backend='triton'")
        if triton_tuning:
            raise ValueError("block_q, block_k, num_warps, interpret and kernels.Tiles tune the Triton kernels; "
                             "pass tiles=mosaic_kernels.MosaicTiles(...) with backend='mosaic', or backend='triton'")
        from pallas_kernels.sliding_window_attention import mosaic_kernels

        multiple = mosaic_kernels.SEQ_MULTIPLE
        options = _Options("mosaic", window=int(window), seq=seq, tiles=(tiles or mosaic_kernels.MosaicTiles()).check())
    elif backend == "triton":
        if head_dim & (head_dim - 1):
            raise ValueError(f"head_dim must be a power of two for the Triton kernel, got {head_dim}; use 'banded'")
        if interpret is None:
            interpret = jax.default_backend() == "cpu"
        if tiles is not None and not isinstance(tiles, kernels.Tiles):
            raise ValueError(f"backend='triton' takes tiles=kernels.Tiles(...), got {type(tiles).__name__}")
        tiles = tiles or default_tiles(seq, head_dim)
        override = {k: v for k, v in dict(block_q=block_q, block_k=block_k, warps=num_warps).items() if v}
        tiles = kernels.Tiles(*(t._replace(**override) for t in tiles))
        for name, t in zip(kernels.Tiles._fields, tiles):
            for field in ("block_q", "block_k"):
                b = getattr(t, field)
                if b < 16 or b & (b - 1):
                    raise ValueError(f"{field} must be a power of two >= 16, got {b} ({name} kernel)")
        multiple = max(b for t in tiles for b in (t.block_q, t.block_k))
        options = _Options("triton", window=int(window), seq=seq, tiles=tiles, interpret=bool(interpret))
    else:
        raise ValueError(f"backend must be 'mosaic', 'triton' or None, got {backend!r}")
    padded = multiple * -(-seq // multiple)
    pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    return _attention(q, k, v, options)[:, :seq]
