"""The Pallas sliding-window attention: padding, defaults and the custom VJP around the kernels.

Semantics of `samba_jax.ops.sliding_window_attention`: query i sees keys i - window < j <= i,
softmax scale 1/sqrt(head_dim), GQA with kv_heads dividing q_heads. On a CPU backend the kernels run
in Pallas interpret mode (tests); on GPU through the Triton backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.sliding_window_attention import kernels


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q, k, v, options):
    return kernels.forward(q, k, v, **options.kw)[0]


def _attention_fwd(q, k, v, options):
    o, lse = kernels.forward(q, k, v, **options.kw)
    return o, (q, k, v, o, lse)


def _attention_bwd(options, residuals, do):
    q, k, v, o, lse = residuals
    return kernels.backward(q, k, v, o, lse, do, **options.kw)


_attention.defvjp(_attention_fwd, _attention_bwd)


class _Options:
    """Static kernel options (hashable, for custom_vjp's non-differentiable argument)."""

    def __init__(self, **kw):
        self.kw = kw

    def __hash__(self):
        return hash(tuple(sorted(self.kw.items())))

    def __eq__(self, other):
        return isinstance(other, _Options) and self.kw == other.kw


def default_tiles(seq: int, head_dim: int) -> kernels.Tiles:
    """The tiles `sliding_window_attention` uses unless told otherwise.

    From the H200 sweep in BENCHMARKS.md (head_dim 128, seq 8192, window 2048): forward 64 x 64 on
    4 warps, 3 stages; dK/dV 128 query x 64 key rows on 8 warps, 2 stages (3 overflow shared memory);
    dQ 128 x 64 on 8 warps, 3 stages. Wider heads keep the untuned 64 x 64 / 8 warps / 2 stages
    everywhere (shared memory), short sequences (< 128) blocks of 64 or 16.
    """
    if seq < 128 or head_dim > 128:
        block = 64 if seq >= 64 else 16
        tile = kernels.Tile(block, block, 4 if head_dim <= 64 else 8, 2)
        return kernels.Tiles(tile, tile, tile)
    return kernels.Tiles(fwd=kernels.Tile(64, 64, 4, 3), dkv=kernels.Tile(128, 64, 8, 2), dq=kernels.Tile(128, 64, 8, 3))


def sliding_window_attention(q, k, v, window: int, *, block_q: int | None = None, block_k: int | None = None,
                             num_warps: int | None = None, tiles: kernels.Tiles | None = None,
                             interpret: bool | None = None):
    """q: (batch, seq, q_heads, head_dim); k, v: (batch, seq, kv_heads, head_dim); window in [1, seq].

    tiles: each kernel's blocks, warps and stages (default `default_tiles`); block_q, block_k,
    num_warps override those of all three kernels. head_dim must be a power of two (Triton tiles).
    Returns q's shape and dtype.
    """
    batch, seq, q_heads, head_dim = q.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the Pallas kernel, got {head_dim}; use 'banded'")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    tiles = tiles or default_tiles(seq, head_dim)
    override = {k: v for k, v in dict(block_q=block_q, block_k=block_k, warps=num_warps).items() if v}
    tiles = kernels.Tiles(*(t._replace(**override) for t in tiles))
    for name, t in zip(kernels.Tiles._fields, tiles):
        for field in ("block_q", "block_k"):
            b = getattr(t, field)
            if b < 16 or b & (b - 1):
                raise ValueError(f"{field} must be a power of two >= 16, got {b} ({name} kernel)")
    block = max(b for t in tiles for b in (t.block_q, t.block_k))
    padded = block * -(-seq // block)
    pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    options = _Options(window=int(window), seq=seq, tiles=tiles, interpret=bool(interpret))
    return _attention(q, k, v, options)[:, :seq]
