"""Mamba-1 selective scan (the S6 recurrence) in pure JAX.

Per channel d and state index n, with Δ = softplus(delta + delta_bias) when delta_softplus:

    h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t          (h_{-1} = initial_state, else 0)
    y_t = Σ_n C_t h_t + D u_t,     then y_t *= silu(z_t) when z is given

Each step is the affine map h -> a*h + b with a = exp(ΔA), b = ΔBu. Such maps compose
associatively, (a1, b1) then (a2, b2) = (a1*a2, a2*b1 + b2), so all prefixes h_t can be
computed with a parallel scan. "reference" runs the recurrence step by step (the test
oracle); "associative" scans the whole sequence at once and so holds (batch, seq, d_inner,
d_state) tensors; "chunked" carries the state across chunks with lax.scan and scans each
rematerialised chunk in parallel. All internal math is float32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# A scan core maps float32 (u, Δ, A, B, C, initial_state, chunk_size) to
# (y_ssm (batch, seq, d_inner), final_state (batch, d_inner, d_state)); y_ssm is C·h only,
# the D skip and the z gate are applied by the caller.
ScanCore = Callable[[Array, Array, Array, Array, Array, Array, int], tuple[Array, Array]]


def _compose(earlier: tuple[Array, Array], later: tuple[Array, Array]) -> tuple[Array, Array]:
    """Compose affine maps h -> a*h + b: apply `earlier`, then `later`."""
    decay_earlier, drive_earlier = earlier
    decay_later, drive_later = later
    return decay_earlier * decay_later, decay_later * drive_earlier + drive_later


def _scan_block(state: Array, u: Array, delta: Array, A: Array, B: Array, C: Array) -> tuple[Array, Array]:
    """Parallel scan over a block of steps starting from `state`.

    state: (batch, d_inner, d_state); u, delta: (batch, steps, d_inner); A: (d_inner, d_state);
    B, C: (batch, steps, d_state). Returns (y (batch, steps, d_inner), last state).
    """
    decay = jnp.exp(delta[..., None] * A)  # (batch, steps, d_inner, d_state)
    drive = (delta * u)[..., None] * B[:, :, None, :]
    # Fold the incoming state into the first step's drive, so the scanned drive *is* h_t.
    drive = drive.at[:, 0].add(decay[:, 0] * state)
    _, states = lax.associative_scan(_compose, (decay, drive), axis=1)
    # Multiply-and-sum rather than einsum: stays float32 exact where GPUs would use TF32 dots.
    y = jnp.sum(states * C[:, :, None, :], axis=-1)
    return y, states[:, -1]


def _scan_reference(u: Array, delta: Array, A: Array, B: Array, C: Array,
                    initial_state: Array, chunk_size: int) -> tuple[Array, Array]:
    """Sequential lax.scan over time, one step at a time (the oracle)."""
    del chunk_size

    def step(state: Array, inputs: tuple[Array, ...]) -> tuple[Array, Array]:
        u_t, delta_t, B_t, C_t = inputs  # (batch, d_inner), (batch, d_inner), (batch, d_state) x2
        state = jnp.exp(delta_t[:, :, None] * A) * state + (delta_t * u_t)[:, :, None] * B_t[:, None, :]
        return state, jnp.sum(state * C_t[:, None, :], axis=-1)

    time_major = tuple(jnp.swapaxes(x, 0, 1) for x in (u, delta, B, C))
    final_state, y = lax.scan(step, initial_state, time_major)
    return jnp.swapaxes(y, 0, 1), final_state


def _scan_associative(u: Array, delta: Array, A: Array, B: Array, C: Array,
                      initial_state: Array, chunk_size: int) -> tuple[Array, Array]:
    """One associative_scan over the whole sequence (baseline; O(seq·d_inner·d_state) memory)."""
    del chunk_size
    return _scan_block(initial_state, u, delta, A, B, C)


def _scan_chunked(u: Array, delta: Array, A: Array, B: Array, C: Array,
                  initial_state: Array, chunk_size: int) -> tuple[Array, Array]:
    """lax.scan over chunks of `chunk_size` steps; a parallel scan inside each chunk.

    The chunk body is rematerialised, so the backward pass keeps only one
    (batch, d_inner, d_state) state per chunk plus the (batch, seq, ·) inputs.
    """
    batch, seq_len, _ = u.shape
    chunk = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // chunk)
    padding = num_chunks * chunk - seq_len

    def to_chunks(x: Array) -> Array:
        """(batch, seq, f) -> (num_chunks, batch, chunk, f), zero-padded at the end."""
        if padding:
            # Zero Δ on padded steps gives exp(0·A) = 1 and ΔBu = 0: the state passes through.
            x = jnp.pad(x, ((0, 0), (0, padding), (0, 0)))
        return jnp.swapaxes(x.reshape(batch, num_chunks, chunk, x.shape[-1]), 0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def chunk_body(state: Array, chunk_inputs: tuple[Array, ...]) -> tuple[Array, Array]:
        u_chunk, delta_chunk, B_chunk, C_chunk = chunk_inputs
        y_chunk, state = _scan_block(state, u_chunk, delta_chunk, A, B_chunk, C_chunk)
        return state, y_chunk

    chunked_inputs = tuple(to_chunks(x) for x in (u, delta, B, C))
    final_state, y = lax.scan(chunk_body, initial_state, chunked_inputs)
    y = jnp.swapaxes(y, 0, 1).reshape(batch, num_chunks * chunk, -1)
    return y[:, :seq_len], final_state


_IMPLEMENTATIONS: dict[str, ScanCore] = {
    "reference": _scan_reference,
    "associative": _scan_associative,
    "chunked": _scan_chunked,
}

# Fastest implementation per backend; a backend missing here gets "chunked".
# GPU: the fused Pallas kernel's forward+backward is 4.8-5.6x faster than "chunked" at the models'
# shapes on an H200 (benchmarks/HISTORY.md, 2026-11-28). CPU: "chunked" (Pallas runs interpreted there).
_DEFAULT_IMPLEMENTATION_BY_PLATFORM: dict[str, str] = {"cpu": "chunked", "gpu": "pallas", "tpu": "chunked"}


# Fused Pallas kernels (pallas_kernels/selective_scan): imported only when asked for, so a CPU
# install never touches a GPU backend; on CPU they run in Pallas interpret mode.
# "pallas:<backend>" picks one kernel module (the benchmarks compare them); "pallas" the default.
_FUSED_IMPLEMENTATIONS = ("pallas", "pallas:triton_channel_major", "pallas:triton", "pallas:tpu")


def resolve_implementation(implementation: str | None) -> str:
    if implementation is None:
        implementation = _DEFAULT_IMPLEMENTATION_BY_PLATFORM.get(jax.default_backend(), "chunked")
    valid = sorted([*_IMPLEMENTATIONS, *_FUSED_IMPLEMENTATIONS])
    if implementation not in valid:
        raise ValueError(f"selective_scan: unknown `implementation` {implementation!r}; "
                         f"valid names are {valid}")
    return implementation


def _layout(axes: tuple[str, ...]) -> str:
    """Render axis names as a shape, e.g. ("d_inner",) -> "(d_inner,)"."""
    return "(" + ", ".join(axes) + ("," if len(axes) == 1 else "") + ")"


def _validate(function: str, u: Array, A: Array, u_axes: tuple[str, ...],
              expected_axes: dict[str, tuple[Array | None, tuple[str, ...]]]) -> None:
    """Check `u` and `A` ranks, then each optional array in `expected_axes` against its axes.

    `expected_axes` maps argument name -> (array or None, axis names among u_axes and "d_state").
    """
    if jnp.ndim(u) != len(u_axes):
        raise ValueError(f"{function}: `u` must have shape {_layout(u_axes)}, got {tuple(jnp.shape(u))}")
    if jnp.ndim(A) != 2:
        raise ValueError(f"{function}: `A` must be 2-D (d_inner, d_state), got shape {tuple(jnp.shape(A))}")
    sizes = dict(zip(u_axes, jnp.shape(u)), d_state=jnp.shape(A)[1])
    if sizes.get("seq", 1) < 1:
        raise ValueError(f"{function}: `u` must have at least one step, got shape {tuple(jnp.shape(u))}")
    for name, (array, axes) in {"A": (A, ("d_inner", "d_state")), **expected_axes}.items():
        expected = tuple(sizes[axis] for axis in axes)
        if array is not None and tuple(jnp.shape(array)) != expected:
            raise ValueError(f"{function}: `{name}` must have shape {_layout(axes)} = {expected}, "
                             f"got {tuple(jnp.shape(array))}")


def _discretization_step(delta: Array, delta_bias: Array | None, delta_softplus: bool) -> Array:
    """Δ in float32: delta (+ delta_bias), through softplus if requested."""
    delta = delta.astype(jnp.float32)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(jnp.float32)
    return jax.nn.softplus(delta) if delta_softplus else delta


def _skip_and_gate(y: Array, u: Array, D: Array | None, z: Array | None) -> Array:
    """y + D·u, times silu(z) if given; float32 in, float32 out."""
    if D is not None:
        y = y + D.astype(jnp.float32) * u
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def selective_scan(u: Array, delta: Array, A: Array, B: Array, C: Array,
                   D: Array | None = None, z: Array | None = None,
                   delta_bias: Array | None = None, delta_softplus: bool = False,
                   initial_state: Array | None = None, return_final_state: bool = False,
                   implementation: str | None = None,
                   chunk_size: int = 64, sequence_splits: int | None = 1,
                   layout: str = "channels_last") -> Array | tuple[Array, Array]:
    """Mamba-1 selective scan, semantics of mamba_ssm's `selective_scan_fn`.

    u, delta, z: (batch, seq, d_inner); A: (d_inner, d_state); B, C: (batch, seq, d_state);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state).
    layout: "channels_last" (above) or "channels_first", mamba_ssm's own: u, delta, z, y
      (batch, d_inner, seq) and B, C (batch, d_state, seq). The fused channel-major kernel (the GPU
      default) reads that layout directly; every other path transposes to channels-last and back.
    implementation: "reference", "associative", "chunked" or "pallas" (fused kernel; "pallas:<backend>"
      picks its kernel module, e.g. "pallas:triton"); None picks the platform default.
    chunk_size: steps per chunk for "chunked", steps between saved states for "pallas" (clipped to seq).
    sequence_splits: scan this many equal pieces of the sequence side by side, as extra batch rows,
      then join them exactly (see `_scan_in_pieces`): more parallel work for kernels that walk the
      sequence, at twice the scan work. None picks `default_sequence_splits`.
    Returns y (batch, seq, d_inner) (channels-first: (batch, d_inner, seq)) in u's dtype, plus the
    float32 final state (batch, d_inner, d_state) if return_final_state.
    """
    u, delta, A, B, C = (jnp.asarray(x) for x in (u, delta, A, B, C))
    D, z, delta_bias, initial_state = (None if x is None else jnp.asarray(x)
                                       for x in (D, z, delta_bias, initial_state))
    if layout == "channels_first":
        sequence, state_sequence = ("batch", "d_inner", "seq"), ("batch", "d_state", "seq")
    elif layout == "channels_last":
        sequence, state_sequence = ("batch", "seq", "d_inner"), ("batch", "seq", "d_state")
    else:
        raise ValueError(f"selective_scan: `layout` must be 'channels_last' or 'channels_first', got {layout!r}")
    _validate("selective_scan", u, A, sequence, {
        "delta": (delta, sequence), "z": (z, sequence), "B": (B, state_sequence),
        "C": (C, state_sequence), "D": (D, ("d_inner",)), "delta_bias": (delta_bias, ("d_inner",)),
        "initial_state": (initial_state, ("batch", "d_inner", "d_state")),
    })
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"selective_scan: `chunk_size` must be an integer >= 1, got {chunk_size!r}")
    implementation = resolve_implementation(implementation)
    if layout == "channels_first" and not (implementation in _FUSED_IMPLEMENTATIONS and sequence_splits == 1):
        # The XLA paths and the split scan are channels-last (the fused wrapper takes either layout).
        swap = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
        out = selective_scan(swap(u), swap(delta), A, swap(B), swap(C), D, None if z is None else swap(z),
                             delta_bias, delta_softplus, initial_state, return_final_state, implementation,
                             chunk_size, sequence_splits)
        return (swap(out[0]), out[1]) if return_final_state else swap(out)
    if sequence_splits is None:
        sequence_splits = default_sequence_splits(implementation, *u.shape)
    if isinstance(sequence_splits, bool) or not isinstance(sequence_splits, numbers.Integral) or sequence_splits < 1:
        raise ValueError(f"selective_scan: `sequence_splits` must be an integer >= 1 (1: no split) or None, "
                         f"got {sequence_splits!r}")
    if sequence_splits > 1 and u.shape[1] >= 2 * sequence_splits:
        y, final_state = _scan_in_pieces(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                         int(sequence_splits), implementation=implementation,
                                         chunk_size=int(chunk_size))
        return (y, final_state) if return_final_state else y
    if implementation in _FUSED_IMPLEMENTATIONS:
        from pallas_kernels.selective_scan import selective_scan as fused_selective_scan

        backend = implementation.partition(":")[2] or None
        return fused_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                                    return_final_state, chunk_size=int(chunk_size), backend=backend, layout=layout)
    scan_core = _IMPLEMENTATIONS[implementation]

    batch, _, d_inner = u.shape
    if initial_state is None:
        initial_state = jnp.zeros((batch, d_inner, A.shape[1]), jnp.float32)
    u32 = u.astype(jnp.float32)
    y, final_state = scan_core(u32, _discretization_step(delta, delta_bias, delta_softplus),
                               A.astype(jnp.float32), B.astype(jnp.float32), C.astype(jnp.float32),
                               initial_state.astype(jnp.float32), int(chunk_size))
    y = _skip_and_gate(y, u32, D, z).astype(u.dtype)
    return (y, final_state) if return_final_state else y


def default_sequence_splits(implementation: str, batch: int, seq: int, d_inner: int) -> int:
    """Sequence pieces for the fused GPU kernel when batch x d_inner alone gives it too little work.

    Each kernel program walks its whole sequence, so with few channel rows (batch x d_inner) the
    GPU idles. Measured on an H200 (benchmarks/HISTORY.md, selective scan): the step-by-step kernel
    ("pallas:triton") at 1 x 16K x 4096 bf16 runs fwd+bwd in 20.5 ms with 16 pieces instead of 42.9,
    so it is split: at <= 8K rows, pieces of >= 512 steps, until 64K rows. The channel-major kernel
    (the default "pallas") is not: unsplit it trains faster (11.5 vs 14.8 ms), and since its
    forward-only tiles (4 channels x 128 steps) fill the GPU at batch 1, samba_1b's unsplit prefill
    is faster too (173.9K against 153.8K tokens/s at 128K; 159.9K against 138.1K at 4K).
    Other implementations: 1.
    """
    if (implementation not in _FUSED_IMPLEMENTATIONS or jax.default_backend() != "gpu"
            or batch * d_inner > _SPLIT_MAX_ROWS):
        return 1
    if implementation in ("pallas", "pallas:triton_channel_major"):
        return 1
    splits = 1
    while batch * d_inner * splits < _SPLIT_TARGET_ROWS and seq // (2 * splits) >= _SPLIT_MIN_STEPS:
        splits *= 2
    return splits


_SPLIT_MAX_ROWS = 8192
_SPLIT_TARGET_ROWS = 65536
_SPLIT_MIN_STEPS = 512


def chunk_decay(delta: Array, A: Array, delta_bias: Array | None, delta_softplus: bool) -> Array:
    """exp(A * sum_t Δ_t) (batch, d_inner, d_state): the decay a whole chunk applies to its incoming state.

    A is constant per (channel, state), so the product of the steps' exp(Δ_t A) is one exponential.
    delta: (batch, seq, d_inner).
    """
    total = jnp.sum(_discretization_step(delta, delta_bias, delta_softplus), axis=1)
    return jnp.exp(A.astype(jnp.float32)[None] * total[..., None])


def _scan_in_pieces(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, pieces, **kwargs):
    """The scan of `pieces` equal pieces side by side, joined exactly; a remainder runs after them.

    Pass 1 scans every piece from a zero state for its final state; piece p's true incoming state
    is then a short sequential fold, h_in[p+1] = decay[p] * h_in[p] + final[p] (decay from
    `chunk_decay`); pass 2 rescans every piece from its true incoming state for y. (Adding
    C_t · (decay up to t) h_in to pass 1's y instead would need a seq x d_inner x d_state tensor.)
    """
    batch, seq, d_inner = u.shape
    length = seq // pieces
    head = pieces * length

    def side_by_side(x):  # (batch, seq, ...) -> (batch * pieces, length, ...)
        return None if x is None else x[:, :head].reshape(batch * pieces, length, *x.shape[2:])

    pu, pdelta, pB, pC, pz = map(side_by_side, (u, delta, B, C, z))
    common = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, sequence_splits=1, **kwargs)
    _, finals = selective_scan(pu, pdelta, A, pB, pC, return_final_state=True, **common)
    decays = chunk_decay(pdelta, A, delta_bias, delta_softplus)
    state_shape = (batch, pieces, d_inner, A.shape[1])
    if initial_state is None:
        h0 = jnp.zeros((batch, *state_shape[2:]), jnp.float32)
    else:
        h0 = initial_state.astype(jnp.float32)

    def fold(h, piece):  # the state entering the next piece, from the state entering this one
        final, decay = piece
        return decay * h + final, h

    _, incoming = lax.scan(fold, h0, (jnp.swapaxes(finals.reshape(state_shape), 0, 1),
                                      jnp.swapaxes(decays.reshape(state_shape), 0, 1)))
    incoming = jnp.swapaxes(incoming, 0, 1).reshape(batch * pieces, *state_shape[2:])
    y, finals = selective_scan(pu, pdelta, A, pB, pC, D=D, z=pz, initial_state=incoming, return_final_state=True,
                               **common)
    y, final = y.reshape(batch, head, d_inner), finals.reshape(state_shape)[:, -1]
    if head < seq:  # the remainder continues from the last piece's state
        rest = (x if x is None else x[:, head:] for x in (u, delta, B, C, z))
        ur, dr, br, cr, zr = rest
        y_rest, final = selective_scan(ur, dr, A, br, cr, D=D, z=zr, initial_state=final, return_final_state=True,
                                       **common)
        y = jnp.concatenate([y, y_rest], axis=1)
    return y, final


def selective_scan_step(state: Array, u: Array, delta: Array, A: Array, B: Array, C: Array,
                        D: Array | None = None, z: Array | None = None,
                        delta_bias: Array | None = None,
                        delta_softplus: bool = False) -> tuple[Array, Array]:
    """One recurrent step, for decoding a single new token.

    state: (batch, d_inner, d_state) f32; u, delta, z: (batch, d_inner); A: (d_inner, d_state);
    B, C: (batch, d_state); D, delta_bias: (d_inner,).
    Returns (y (batch, d_inner) in u's dtype, new_state (batch, d_inner, d_state) f32).
    """
    state, u, delta, A, B, C = (jnp.asarray(x) for x in (state, u, delta, A, B, C))
    D, z, delta_bias = (None if x is None else jnp.asarray(x) for x in (D, z, delta_bias))
    token, token_state = ("batch", "d_inner"), ("batch", "d_state")
    _validate("selective_scan_step", u, A, token, {
        "state": (state, ("batch", "d_inner", "d_state")), "delta": (delta, token), "z": (z, token),
        "B": (B, token_state), "C": (C, token_state), "D": (D, ("d_inner",)),
        "delta_bias": (delta_bias, ("d_inner",)),
    })
    u32 = u.astype(jnp.float32)
    delta32 = _discretization_step(delta, delta_bias, delta_softplus)
    decay = jnp.exp(delta32[:, :, None] * A.astype(jnp.float32))
    drive = (delta32 * u32)[:, :, None] * B.astype(jnp.float32)[:, None, :]
    new_state = decay * state.astype(jnp.float32) + drive
    y = jnp.sum(new_state * C.astype(jnp.float32)[:, None, :], axis=-1)
    return _skip_and_gate(y, u32, D, z).astype(u.dtype), new_state
