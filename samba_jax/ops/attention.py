"""Causal sliding-window attention with grouped-query heads, in pure JAX.

`sliding_window_attention` lets query i see keys j with i - window < j <= i (the window counts
the current token: the Samba reference's window 2048 is flash-attn's window_size=(2047, 0));
window=None is full causal attention. Implementations are picked by name: "reference" is dense
and obviously right (the test oracle); "banded" is blocked XLA whose memory is
O(seq * (window + block)), never seq x seq; "cudnn" is cuDNN's fused flash attention with a local
window (NVIDIA GPUs, bfloat16/float16; other dtypes fall back to "banded"); "splash" is jax's TPU
splash attention kernel with a causal band mask (TPU; Pallas interpret mode elsewhere, for tests);
"pallas" is our flash-style kernel (pallas_kernels/sliding_window_attention): Mosaic GPU on Hopper
(bf16/fp16, head_dim 64 or 128; on an H200 at cuDNN's training speed at window 2048, 1.03-1.18x
faster at window 512, slower at 4096, benchmarks/HISTORY.md), Triton on other GPUs, interpret mode on CPU.
Logits, softmax and accumulation run in float32;
the output has q's dtype. `sliding_window_attention_decode` serves one new token per sequence
against a ring-buffer KV cache during generation.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

# Finite rather than -inf so that a fully masked row (possible only in decode with an empty
# cache) gives a finite uniform average instead of NaN; exp(min - max) still underflows to 0.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)
_MAX_DEFAULT_BLOCK = 512
_MIN_DEFAULT_BLOCK = 16


def _check_inputs(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None, block_size: int | None) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 (batch, seq, heads, head_dim), got shape {x.shape}; "
                             "reshape it to that layout")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {k.shape} and v {v.shape}; "
                         "project both to (batch, seq, kv_heads, head_dim)")
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        raise ValueError(f"q {q.shape} and k {k.shape} must agree in batch, seq and head_dim; "
                         "pass q, k, v from the same sequence with the same head_dim")
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        raise ValueError(f"kv_heads={k.shape[2]} (k axis 2) must divide q_heads={q.shape[2]}; "
                         "choose kv_heads among the divisors of q_heads")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a Python int >= 1 (current token included) or None for full causal "
                         f"attention, got {window!r}")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a Python int >= 1 or None for the default, got {block_size!r}")


def _default_block_size(seq: int, window: int) -> int:
    """Each query block computes (window + block) logits per query, so the block should be about the
    window (no wider, or short windows waste most of the band) but at most 512, where matmuls are
    already efficient and the masked tail of the band stays <= 25% for the reference's window 2048."""
    block = min(_MAX_DEFAULT_BLOCK, max(_MIN_DEFAULT_BLOCK, 1 << (window - 1).bit_length()))
    return min(block, seq)  # one block, no padding, when the sequence is short


def _reference(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block_size: int | None) -> jax.Array:
    """Dense (seq x seq) masked attention in float32: memory O(seq^2), used as the oracle."""
    del block_size
    seq, group = q.shape[1], q.shape[2] // k.shape[2]
    qf = q.astype(jnp.float32)
    kf = jnp.repeat(k.astype(jnp.float32), group, axis=2)  # query head h uses kv head h // group
    vf = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(q.shape[-1])
    i = jnp.arange(seq)[:, None]
    j = jnp.arange(seq)[None, :]
    mask = (j <= i) & (j > i - window)
    probs = jax.nn.softmax(jnp.where(mask, logits, _MASK_VALUE), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, vf).astype(q.dtype)


# Query blocks are processed in groups whose float32 band logits stay under this many elements
# (1 GiB), so memory does not grow with the sequence: long sequences loop over groups.
_BAND_LOGITS_BUDGET = 1 << 28


def _band_group(q_blocks: jax.Array, k_blocks: jax.Array, v_blocks: jax.Array, first: jax.Array, *, window: int,
                block: int, lead: int) -> jax.Array:
    """Attention of query blocks first .. first + C - 1 over their bands.

    q_blocks: (batch, C, block, kv_heads, group, head_dim); k_blocks, v_blocks: (batch, C + n_k - 1,
    block, kv_heads, head_dim), the left-padded key blocks first .. first + C + n_k - 2.
    Returns (batch, C, block, kv_heads, group, head_dim) float32.
    """
    n_q, n_k = q_blocks.shape[1], k_blocks.shape[1] - q_blocks.shape[1] + 1
    head_dim = q_blocks.shape[-1]
    # Band of query block n = padded keys [n*block, (n + n_k)*block): n_k shifted views side by side.
    k_band = jnp.concatenate([k_blocks[:, j:j + n_q] for j in range(n_k)], axis=2)
    v_band = jnp.concatenate([v_blocks[:, j:j + n_q] for j in range(n_k)], axis=2)
    logits = jnp.einsum("bnqkgd,bnckd->bnkgqc", q_blocks, k_band,
                        preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    # Query n*block + r and band column c (absolute key n*block + c - lead): the distance
    # r + lead - c must lie in [0, window), and left-pad columns (key < 0) are masked out.
    r = jnp.arange(block)[:, None]
    c = jnp.arange(n_k * block)[None, :]
    dist = r + lead - c
    in_window = (dist >= 0) & (dist < window)
    not_pad = (first + jnp.arange(n_q))[:, None] * block + c[0][None, :] >= lead
    mask = in_window[None, :, :] & not_pad[:, None, :]  # (n_q, block, n_k * block)
    logits = jnp.where(mask[None, :, None, None], logits, _MASK_VALUE)
    # Normalise after the PV product (as flash attention does): one band-sized tensor, not two.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp(logits - row_max)
    denom = jnp.sum(weights, axis=-1)[..., None]
    out = jnp.einsum("bnkgqc,bnckd->bnkgqd", weights.astype(v_blocks.dtype), v_band,
                     preferred_element_type=jnp.float32) / denom
    return out.transpose(0, 1, 4, 2, 3, 5)


def _banded_core(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block: int) -> jax.Array:
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    n_q = -(-seq // block)
    # Key blocks per query block: its own plus enough earlier ones to reach i - window + 1 for its
    # first query; clipped to n_q so a window beyond seq costs no more than blocked causal attention.
    n_k = min(-(-(window - 1) // block) + 1, n_q)
    lead = (n_k - 1) * block
    per_block = batch * q_heads * block * n_k * block  # logits of one query block
    size = max(1, min(n_q, _BAND_LOGITS_BUDGET // per_block))  # query blocks per group
    groups = -(-n_q // size)
    tail = groups * size * block - seq

    q = jnp.pad(q, ((0, 0), (0, tail), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (lead, tail), (0, 0), (0, 0)))  # left pad: block 0 has a full band too
    v = jnp.pad(v, ((0, 0), (lead, tail), (0, 0), (0, 0)))
    # GQA without repeating K/V: the group axis rides along in the einsums.
    q_blocks = q.reshape(batch, groups * size, block, kv_heads, group, head_dim)
    k_blocks = k.reshape(batch, groups * size + n_k - 1, block, kv_heads, head_dim)
    v_blocks = v.reshape(batch, groups * size + n_k - 1, block, kv_heads, head_dim)
    attend = functools.partial(_band_group, window=window, block=block, lead=lead)
    if groups == 1:
        out = attend(q_blocks, k_blocks, v_blocks, jnp.int32(0))
    else:  # one group at a time, each rematerialised in the backward: memory of one group
        def one_group(i):
            first = i * size
            take = lambda x, n: jax.lax.dynamic_slice_in_dim(x, first, n, axis=1)  # noqa: E731
            return jax.checkpoint(attend)(take(q_blocks, size), take(k_blocks, size + n_k - 1),
                                          take(v_blocks, size + n_k - 1), first)

        out = jax.lax.map(one_group, jnp.arange(groups))  # (groups, batch, size, block, kv, g, d)
        out = jnp.moveaxis(out, 0, 1)
    out = out.reshape(batch, groups * size * block, q_heads, head_dim)
    return out[:, :seq].astype(q.dtype)


def _banded(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block_size: int | None) -> jax.Array:
    """Blocked XLA attention over a (block, window + block) band per query block."""
    block = min(block_size or _default_block_size(q.shape[1], window), q.shape[1])
    # Rematerialise in the backward pass: autodiff would otherwise keep the float32 band weights,
    # batch*seq*heads*(window+block) floats per layer (640 MiB per sequence at seq 4096, window
    # 2048, 16 heads); recomputing them costs one extra QK^T and exp, the trade flash attention makes.
    core = jax.checkpoint(functools.partial(_banded_core, window=window, block=block))
    return core(q, k, v)


_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_SEQ_MULTIPLE = 64


def _cudnn_supports(q: jax.Array) -> bool:
    head_dim = q.shape[-1]
    return q.dtype in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block_size: int | None) -> jax.Array:
    """cuDNN flash attention: causal plus a left window of window - 1 keys; GQA natively (no K/V copies).

    is_causal=True always: with only local_window_size, jax 0.11 lets queries see future keys.
    Float32 inputs or head_dim not a multiple of 8 up to 128 (cuDNN's limits) run "banded" instead.
    """
    if not _cudnn_supports(q):
        return _banded(q, k, v, window, block_size)
    group = q.shape[2] // k.shape[2]
    if window == 1:  # attention to itself only: the output is v (cuDNN's window of 1 failed the H200 test)
        return jnp.repeat(v, group, axis=2).astype(q.dtype)
    seq = q.shape[1]
    # cuDNN's backward refuses odd lengths (seen on the H200 at 129 and 257): pad the end. Causality
    # keeps real queries from seeing the padded keys, and the padded rows are sliced off.
    pad = -seq % _CUDNN_SEQ_MULTIPLE
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    local = None if window >= seq else (window - 1, 0)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation="cudnn")
    return out[:, :seq]


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block_size: int | None) -> jax.Array:
    from samba_jax.ops.splash_attention import splash_attention  # TPU kernels: imported when used

    return splash_attention(q, k, v, window, block_size)


def _pallas(q: jax.Array, k: jax.Array, v: jax.Array, window: int, block_size: int | None) -> jax.Array:
    from pallas_kernels.sliding_window_attention import sliding_window_attention as pallas_attention

    return pallas_attention(q, k, v, window, block_q=block_size, block_k=block_size)


# Name -> implementation(q, k, v, window, block_size); window already clipped to [1, seq].
_IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "reference": _reference,
    "banded": _banded,
    "cudnn": _cudnn,
    "splash": _splash,
    "pallas": _pallas,
}


def _default_implementation() -> str:
    """cuDNN on NVIDIA GPUs, splash on TPU (block-sparse band; not yet measured on a TPU), else
    blocked XLA. On an H200 our Mosaic GPU kernel ("pallas") ties cuDNN at Samba's window 2048 and
    trains faster at window 512 but runs some of those forwards slower (0.83-0.88x at 16K-128K) and
    loses at 4096 (benchmarks/HISTORY.md), so cuDNN, never slower than itself, stays the default; pass
    implementation="pallas" (model.attention_implementation) for short windows."""
    return {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "banded")


def sliding_window_attention(q: jax.Array, k: jax.Array, v: jax.Array, window: int | None,
                             implementation: str | None = None, block_size: int | None = None) -> jax.Array:
    """Causal sliding-window attention: query i attends to keys j with i - window < j <= i.

    q: (batch, seq, q_heads, head_dim); k, v: (batch, seq, kv_heads, head_dim), kv_heads dividing
    q_heads (query head h uses kv head h // (q_heads // kv_heads)). window: int >= 1 counting the
    current token, or None (or >= seq) for full causal attention. implementation: a name from
    _IMPLEMENTATIONS, None for the platform's best. block_size: query block of "banded" (None: about
    the window, at most 512). Softmax scale 1/sqrt(head_dim). Returns (batch, seq, q_heads, head_dim)
    in q's dtype.
    """
    _check_inputs(q, k, v, window, block_size)
    name = _default_implementation() if implementation is None else implementation
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {sorted(_IMPLEMENTATIONS)} or None, got {name!r}")
    if name == "splash" and jax.default_backend() == "gpu":
        raise ValueError("implementation='splash' is a TPU kernel; on a GPU use 'cudnn' or None")
    if name == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU, but the default backend is "
                         f"{jax.default_backend()!r}; use 'banded' or None (the platform's best)")
    seq = q.shape[1]
    window = seq if window is None else min(window, seq)  # a window beyond seq is full causal attention
    return _IMPLEMENTATIONS[name](q, k, v, window, block_size)


def sliding_window_attention_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                                    cache_positions: jax.Array, position: jax.Array,
                                    window: int | None, implementation: str | None = None) -> jax.Array:
    """One new query per sequence against a ring-buffer KV cache.

    q: (batch, q_heads, head_dim); k_cache, v_cache: (batch, cache_len, kv_heads, head_dim), the
    new token's k/v already written (cache_len >= 1, typically == window); cache_positions:
    (batch, cache_len) int32 absolute position held in each slot, -1 for empty; position: (batch,)
    int32 absolute position of the query. Attends to slots with position - window < p <= position
    and p >= 0 (window None: no lower bound). implementation: "xla" (einsums and a softmax, the
    reference), "pallas" (pallas_kernels/sliding_window_attention/decode.py: flash decoding, K and V
    read once in one kernel; needs a power-of-two head_dim) or None: "pallas" for a window on a GPU,
    else "xla" (on an H200, samba_1b's SWA step: 1.98 instead of 2.25 ms per decode step; a 1B
    Transformer's full-attention GQA cache: slower, 27.8 instead of 13.9 ms at 64K; benchmarks/HISTORY.md).
    Returns (batch, q_heads, head_dim) in q's dtype.
    """
    if q.ndim != 3:
        raise ValueError(f"q must have rank 3 (batch, q_heads, head_dim), got shape {q.shape}")
    if k_cache.ndim != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be (batch, cache_len, kv_heads, head_dim), got "
                         f"k_cache {k_cache.shape} and v_cache {v_cache.shape}")
    batch, cache_len, kv_heads, head_dim = k_cache.shape
    if cache_len < 1 or (q.shape[0], q.shape[2]) != (batch, head_dim):
        raise ValueError(f"q {q.shape} and k_cache {k_cache.shape} must agree in batch and head_dim, "
                         "and cache_len must be >= 1")
    if q.shape[1] % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} (k_cache axis 2) must divide q_heads={q.shape[1]}")
    if cache_positions.shape != (batch, cache_len):
        raise ValueError(f"cache_positions must have shape (batch, cache_len) = {(batch, cache_len)}, "
                         f"got {cache_positions.shape}")
    if position.shape != (batch,):
        raise ValueError(f"position must have shape (batch,) = {(batch,)}, got {position.shape}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a Python int >= 1 or None, got {window!r}")

    power_of_two = head_dim & (head_dim - 1) == 0
    if implementation is None:
        implementation = "pallas" if jax.default_backend() == "gpu" and power_of_two and window else "xla"
    if implementation not in ("xla", "pallas"):
        raise ValueError(f"implementation must be 'xla', 'pallas' or None, got {implementation!r}")
    if implementation == "pallas":
        if not power_of_two:
            raise ValueError(f"implementation='pallas' needs a power-of-two head_dim, got {head_dim}; use 'xla'")
        if jax.default_backend() == "tpu":
            raise ValueError("implementation='pallas' is a GPU (Triton) kernel; on TPU use 'xla' or None")
        from pallas_kernels.sliding_window_attention.decode import attention_decode

        return attention_decode(q, k_cache, v_cache, cache_positions, position, window=window)
    group = q.shape[1] // kv_heads
    qg = q.reshape(batch, kv_heads, group, head_dim)
    logits = jnp.einsum("bkgd,bckd->bkgc", qg, k_cache,
                        preferred_element_type=jnp.float32) / math.sqrt(head_dim)
    p = cache_positions
    pos = position[:, None]
    visible = (p >= 0) & (p <= pos)
    if window is not None:
        visible &= p > pos - window
    logits = jnp.where(visible[:, None, None, :], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgc,bckd->bkgd", probs.astype(v_cache.dtype), v_cache,
                     preferred_element_type=jnp.float32)
    return out.reshape(batch, q.shape[1], head_dim).astype(q.dtype)
