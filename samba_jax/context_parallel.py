"""The sequence-mixing ops on a device mesh: per-device kernels, with the sequence split over `context`.

XLA's SPMD partitioner splits matmuls, norms and the short causal conv on its own, but it cannot
split a Pallas or cuDNN custom call, and a recurrence over a split sequence needs the state of the
shards before. These wrappers run the ops under `shard_map` (batch over the batch axes, channels
or heads over `tensor`, the sequence over `context`):

- selective scan: each shard first scans its piece from a zero state for its final state; since
  A is constant per (channel, state), a shard's total decay is exp(A * sum of its Δ). One small
  all-gather of (final state, decay) per shard lets every shard fold the states of the shards
  before it into its incoming state, and a second local scan from that state gives the exact
  output (recurrentgemma's multi-shard correction, for Mamba-1's (d_inner, d_state) state; the
  second scan replaces the correction term, which would need a seq x d_inner x d_state tensor).
- sliding-window attention: each shard receives the last window - 1 keys and values of the shard
  before (a halo, one collective permute) and attends its queries over [halo, own keys].
- full causal attention (and windows longer than a shard): ring attention. The key/value shards go
  round the ring, one collective permute per step; each shard folds every visiting block into its
  queries' output with the online softmax (running max, normaliser, weighted sum).

Without an active mesh (or on one device) they call the plain ops.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from samba_jax import sharding
from samba_jax.ops.attention import sliding_window_attention
from samba_jax.ops.selective_scan import chunk_decay, selective_scan


def scan_across_shards(u, delta, A, B, C, D, z, delta_bias, *, axis: str, delta_softplus: bool, **kwargs):
    """Inside shard_map: the selective scan of a sequence split over mesh axis `axis` (local views)."""
    _, final = selective_scan(u, delta, A, B, C, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              return_final_state=True, **kwargs)  # (batch, d_inner, d_state), from zero
    decay = chunk_decay(delta, A, delta_bias, delta_softplus)  # product over the shard of exp(Δ_t A)
    finals = lax.all_gather(final, axis)  # (shards, batch, d_inner, d_state)
    decays = lax.all_gather(decay, axis)
    me = lax.axis_index(axis)

    def fold(j, h):  # the state entering shard j+1, from the state entering shard j
        return jnp.where(j < me, decays[j] * h + finals[j], h)

    incoming = lax.fori_loop(0, finals.shape[0], fold, jnp.zeros_like(final))
    return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                          initial_state=incoming, **kwargs)


def attention_across_shards(q, k, v, *, window: int, axis: str, **kwargs):
    """Inside shard_map: causal sliding-window attention of a sequence split over mesh axis `axis`.

    Needs window - 1 <= the local length (the halo comes from one neighbour).
    """
    halo = window - 1
    shards = lax.axis_size(axis)
    if halo == 0 or shards == 1:
        return sliding_window_attention(q, k, v, window, **kwargs)
    if halo > q.shape[1]:
        raise ValueError(f"window - 1 = {halo} keys exceed the {q.shape[1]} tokens per context shard; use fewer "
                         "context shards or a longer sequence")
    to_next = [(i, i + 1) for i in range(shards - 1)]
    k_halo = lax.ppermute(k[:, -halo:], axis, to_next)  # shard 0 receives zeros, and ignores them
    v_halo = lax.ppermute(v[:, -halo:], axis, to_next)

    # Every shard runs one attention over halo + local tokens. Shards after the first put the halo
    # in front ([halo keys, own keys], queries padded in front); the first shard, which has no
    # tokens before it, puts the padding *after* its own tokens, where causality hides it. A select
    # (not lax.cond, whose gradient keeps both branches' residuals) picks the layout per shard.
    first = lax.axis_index(axis) == 0

    def extend(x, x_halo):
        pad = jnp.zeros_like(x_halo)
        return jnp.where(first, jnp.concatenate([x, pad], 1), jnp.concatenate([x_halo, x], 1))

    q_ext = extend(q, jnp.zeros((q.shape[0], halo) + q.shape[2:], q.dtype))
    out = sliding_window_attention(q_ext, extend(k, k_halo), extend(v, v_halo), window, **kwargs)
    return lax.dynamic_slice_in_dim(out, jnp.where(first, 0, halo), q.shape[1], axis=1)


def ring_attention_across_shards(q, k, v, *, window: int | None, axis: str):
    """Inside shard_map: causal attention (window None: full) of a sequence split over mesh axis `axis`.

    q: (batch, local, q_heads, head_dim); k, v: (batch, local, kv_heads, head_dim), local views.
    Float32 math with explicit masks from global positions (plain XLA: not the fused kernels; a
    shard holds (batch, heads, local, local) scores per step). Every shard computes all `shards`
    blocks, including those its causal mask empties (no load balancing yet).
    """
    shards, me = lax.axis_size(axis), lax.axis_index(axis)
    batch, local, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qf = (q.astype(jnp.float32) * head_dim ** -0.5).reshape(batch, local, kv_heads, group, head_dim)
    q_pos = me * local + jnp.arange(local)
    ring = [(i, (i + 1) % shards) for i in range(shards)]
    masked = -1e30  # finite: a fully masked block then adds exp(-1e30 - max) = 0, never NaN

    def visit(carry, step):
        k_blk, v_blk, running_max, norm, acc = carry
        k_pos = ((me - step) % shards) * local + jnp.arange(local)  # the block that arrived `step` hops ago
        allowed = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - window
        scores = jnp.einsum("bqkgd,bskd->bkgqs", qf, k_blk.astype(jnp.float32))
        scores = jnp.where(allowed, scores, masked)
        new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
        weights = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        norm = norm * rescale + jnp.sum(weights, axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", weights, v_blk.astype(jnp.float32))
        k_blk, v_blk = lax.ppermute(k_blk, axis, ring), lax.ppermute(v_blk, axis, ring)
        return (k_blk, v_blk, new_max, norm, acc), None

    stats = (batch, kv_heads, group, local)
    carry = (k, v, jnp.full(stats, masked, jnp.float32), jnp.zeros(stats, jnp.float32),
             jnp.zeros(stats + (head_dim,), jnp.float32))
    # Step 0 is the shard's own (diagonal) block, where every query sees at least itself.
    (_, _, _, norm, acc), _ = lax.scan(visit, carry, jnp.arange(shards))
    out = acc / norm[..., None]  # (batch, kv_heads, group, local, head_dim)
    return jnp.moveaxis(out, 3, 1).reshape(batch, local, heads, head_dim).astype(q.dtype)


def _shards(mesh, axes) -> int:
    """How many pieces mesh axes `axes` (None, a name or a tuple of names) split a dimension into.

    A mesh always has a `context` axis, usually of size 1; the two-pass context-parallel paths must
    not run then (on 2 H200s they made every Mamba layer scan twice: benchmarks/HISTORY.md, scale-out)."""
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _names_to_spec(*names):
    return sharding.logical_spec(names)


def selective_scan_on_mesh(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kwargs):
    """`selective_scan` for global arrays on the active mesh; shapes as ops.selective_scan."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              **kwargs)
    seq_spec = _names_to_spec("act_batch", "act_length", "ssm_inner")
    state_spec = _names_to_spec("act_batch", "act_length", None)
    channel = _names_to_spec("ssm_inner")
    a_spec = _names_to_spec("ssm_inner", None)
    context = seq_spec[1]
    if _shards(mesh, context) == 1:  # the sequence is whole on every device: the plain op, one pass
        body = functools.partial(selective_scan, delta_softplus=delta_softplus, **kwargs)
        body = _positional(body)
    else:
        body = _positional(functools.partial(scan_across_shards, axis=context, delta_softplus=delta_softplus,
                                             **kwargs))
    optional = (D, z, delta_bias)
    specs = (channel, seq_spec, channel)
    present = tuple(x is not None for x in optional)

    def local(u, delta, A, B, C, *rest):
        it = iter(rest)
        d, zz, bias = (next(it) if p else None for p in present)
        return body(u, delta, A, B, C, d, zz, bias)

    in_specs = (seq_spec, seq_spec, a_spec, state_spec, state_spec) + tuple(s for s, p in zip(specs, present) if p)
    args = (u, delta, A, B, C) + tuple(x for x in optional if x is not None)
    return jax.shard_map(local, in_specs=in_specs, out_specs=seq_spec, check_vma=False)(*args)


def _positional(fn):
    return lambda u, delta, A, B, C, D, z, bias: fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias)


def causal_conv_on_mesh(x, kernel, bias, conv):
    """`conv(x, kernel, bias)` (Mamba's causal depthwise conv; x (batch, seq, d_inner)) on the active mesh.

    With the sequence split over `context`, each shard receives the previous shard's last
    width - 1 inputs (one collective permute; the first shard receives zeros, which is exactly the
    conv's causal zero padding) and convolves [halo, own] locally. Left to the SPMD partitioner,
    the conv's shifted slices of a split sequence each became a separate buffer (on 2 CPU devices:
    +30 MiB of 216 for a 2-repeat toy at local length 4096)."""
    mesh = jax.sharding.get_abstract_mesh()
    seq_spec = _names_to_spec("act_batch", "act_length", "ssm_inner")
    context = None if mesh.empty else seq_spec[1]
    if mesh.empty or _shards(mesh, context) == 1:
        return conv(x, kernel, bias)
    tail = kernel.shape[0] - 1

    def local(x, kernel, bias):
        shards = lax.axis_size(context)
        halo = lax.ppermute(x[:, x.shape[1] - tail:], context, [(i, i + 1) for i in range(shards - 1)])
        return conv(jnp.concatenate([halo, x], axis=1), kernel, bias)[:, tail:]

    specs = (seq_spec, _names_to_spec("conv_width", "ssm_inner"), _names_to_spec("ssm_inner"))
    return jax.shard_map(local, in_specs=specs, out_specs=seq_spec, check_vma=False)(x, kernel, bias)


def sliding_window_attention_on_mesh(q, k, v, window, **kwargs):
    """`sliding_window_attention` for global (batch, seq, heads, head_dim) arrays on the active mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return sliding_window_attention(q, k, v, window, **kwargs)
    q_spec = _names_to_spec("act_batch", "act_length", "heads", None)
    kv_spec = _names_to_spec("act_batch", "act_length", "kv_heads", None)
    context = q_spec[1]
    shards = _shards(mesh, context)
    if shards == 1:  # the sequence is whole on every device: no halo, no ring
        local = functools.partial(sliding_window_attention, window=window, **kwargs)
    else:
        seq = q.shape[1]
        if window is not None and window - 1 <= seq // shards:  # the halo fits in one neighbour
            local = functools.partial(attention_across_shards, window=window, axis=context, **kwargs)
        else:  # full causal attention, or a window reaching past the previous shard
            local = functools.partial(ring_attention_across_shards, window=None if window is None or window >= seq
                                      else window, axis=context)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)(q, k, v)
