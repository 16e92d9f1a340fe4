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


def sliding_window_attention(q, k, v, window: int, *, block_q: int | None = None, block_k: int | None = None,
                             num_warps: int | None = None, interpret: bool | None = None):
    """q: (batch, seq, q_heads, head_dim); k, v: (batch, seq, kv_heads, head_dim); window in [1, seq].

    block_q, block_k: query and key tile (powers of two; default 64 each, 16 for short sequences);
    head_dim must be a power of two (Triton tiles). Returns q's shape and dtype.
    """
    batch, seq, q_heads, head_dim = q.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the Pallas kernel, got {head_dim}; use 'banded'")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    default = 64 if seq >= 64 else 16
    block_q, block_k = block_q or default, block_k or default
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {b}")
    tile = max(block_q, block_k)
    padded = tile * -(-seq // tile)
    pad = ((0, 0), (0, padded - seq), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    options = _Options(window=int(window), seq=seq, block_q=block_q, block_k=block_k,
                       num_warps=num_warps or (4 if head_dim <= 64 else 8), interpret=bool(interpret))
    return _attention(q, k, v, options)[:, :seq]
