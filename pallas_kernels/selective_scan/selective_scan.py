"""The Pallas selective scan: layouts, padding and the custom VJP around the kernels.

Semantics of mamba_ssm's `selective_scan_fn`, channels-last (as `samba_jax.ops.selective_scan`):
Δ = softplus(delta + delta_bias) if asked; h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t;
y_t = C_t·h_t + D u_t; y *= silu(z). Everything from the softplus to the gate runs inside the
kernel; the backward recomputes states from chunk-boundary states, so no (batch, seq, d_inner,
d_state) tensor is ever allocated. On a CPU backend the same kernels run in Pallas interpret mode.
Interchangeable kernel modules: `triton_channel_major_kernels` (GPU, a parallel scan per tile of
steps with the steps contiguous; the fastest measured, the default off TPU), `triton_kernels` (GPU,
one step at a time, backend="triton") and `tpu_kernels` (Mosaic TPU; the default on TPU, or forced
with backend="tpu", e.g. in interpret mode on CPU).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from pallas_kernels.selective_scan import tpu_kernels, triton_channel_major_kernels, triton_kernels

F32 = jnp.float32


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_block_d(batch: int, width: int) -> int:
    """Widest channel block (up to 64) that still gives >= 256 programs, about two per H200 SM.

    Each program walks the whole sequence, so the grid must fill the GPU: measured on an H200
    (benchmarks/HISTORY.md), 64 is fastest at batch*d_inner >= 16K and 16 at batch 1, d_inner 4096.
    """
    for block in (64, 32):
        if batch * width // block >= 256:
            return block
    return 16


def default_tuning(batch: int, width: int, block_d: int) -> dict[str, int]:
    """Warps and prefetch depth per kernel of the step-by-step backend, from the H200 sweep in benchmarks/HISTORY.md.

    Forward: loading 4 steps ahead with 2 warps halves its time at every measured shape. Backward:
    4 steps ahead helps when programs are few (<= 256) and costs registers, hence occupancy, when
    there are more; 4 warps. (The tile kernel ignores the prefetch depth.)
    """
    programs = batch * (-(-width // block_d))
    return dict(fwd_warps=2, fwd_prefetch=4, bwd_warps=4, bwd_prefetch=4 if programs <= 256 else 0)


CHANNEL_MAJOR_TILE = 32  # steps per tile of the channel-major kernels (fastest in the H200 sweep)
_PARTIALS_BUDGET = 6 << 30  # bytes of per-block dB, dC partial sums the channel-major backward may write
_FOUR_ROW_SUMS_MAX_PROGRAMS = 2048  # backward programs up to which `channel_sums`' four-row sums pay


def default_atomic_cols() -> int:
    """1: the channel-major backward adds its dB, dC sums over channel blocks into one accumulator with
    relaxed float32 atomics, as mamba_ssm does, rather than writing per-block partial sums for XLA to
    reduce. The sum order, hence the last bits of dB and dC, then varies from run to run. Interleaved
    A/B on an H100 (benchmarks/HISTORY.md, 2026-12-07): forward+backward 1.07x (4 x 4096 x 4096), 1.09x
    (1 x 16384 x 4096), 1.01x (8 x 4096 x 3072) the partials' speed in bf16, 1.05x in float32, at a
    ninth of the temporary memory (samba_1b's 8 x 4096 train step fits an 80 GB H100 only this way).
    0 where XLA_FLAGS asks for deterministic GPU ops (--xla_gpu_deterministic_ops, JAX's switch for
    run-to-run identical results): then the partials, whose sums XLA reduces in a fixed order."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        name, _, value = flag.partition("=")
        if name == "--xla_gpu_deterministic_ops" and value.lower() in ("", "true", "1"):
            return 0
    return 1


def default_four_row_sums(batch: int, width: int, block_d: int) -> int:
    """1 where the channel-major backward should sum dB, dC over channels 4 states at a time.

    Those sums (`channel_sums`) take fewer instructions and stall less per warp, but ptxas then gives
    the kernel 255 registers instead of 168: 8 one-warp programs per SM instead of 12. They pay when
    the grid is small against the GPU and lose when it is many waves deep. Forward+backward on an H100
    (132 SMs; bf16, benchmarks/HISTORY.md, 2026-12-06): 1 x 16384 x 4096 (1024 programs) 11% faster, 2 x 8192 x
    4096 (2048) 16% faster, 4 x 4096 x 4096 (4096) 2% slower, 8 x 4096 x 3072 (6144) 10% slower."""
    return int(batch * -(-width // block_d) <= _FOUR_ROW_SUMS_MAX_PROGRAMS)


def default_channel_major_tuning(batch: int, seq: int, width: int, chunk: int, itemsize: int = 2,
                                 atomic_cols: bool | None = None) -> dict[str, int]:
    """Channels and warps per program of the channel-major kernels, from the H200 sweeps in benchmarks/HISTORY.md.

    The fastest bf16 forward tiles hold 8 steps per thread (one 16-byte load): 16 channels x 32
    steps on 2 warps; with float32 inputs (itemsize 4), 4 channels on one warp (2.0 against 2.8 ms
    at 4 x 4096 x 4096). The backward, which keeps more values per element live, is fastest with
    4 channels on one warp.
    Forward-only calls (prefill, evaluation: no backward reads their saved states, so their tiles
    need not be the backward's 32 steps) scan longer tiles: 4 channels x 128 steps (bf16) or
    8 x 64 (float32) on 2 warps, 1.3-2.5x faster than the training forward (same sweeps).
    atomic_cols (`bwd_atomic_cols`; None: `default_atomic_cols`, 1 unless XLA is asked for
    deterministic ops): the backward adds its dB, dC sums into one accumulator, so its block stays at
    4 channels on one warp whatever the shape, with four-row sums (there both ways of summing compile
    to 255 registers, and four-row sums to fewer instructions: benchmarks/HISTORY.md, 2026-12-06, third
    session). Without it (deterministic) the backward writes dB and dC partial sums per channel block
    (batch, width / block, d_state, seq) float32, so its block widens until those fit in 6 GiB
    (samba_1b at 8 x 4096: block 4, 4.8 GB; measured in its train step, a 2 GiB budget gave block 32
    and no gain over the step kernel), and four-row sums only on small grids.
    """
    if atomic_cols is None:
        atomic_cols = bool(default_atomic_cols())
    bwd_block = 4
    while not atomic_cols and bwd_block < 64 and 2 * batch * (width // bwd_block) * 16 * seq * 4 > _PARTIALS_BUDGET:
        bwd_block *= 2
    # Forward: 8 elements per thread. Backward at 4 x 4096 x 4096 bf16 (H200): block 8 on 1 warp
    # 7.5 ms (2 warps 7.7), block 16 on 4 warps 7.5 ms (2 warps 9.1), so 1 warp up to block 8,
    # then 4 channels per warp, at most 4 warps.
    fwd_block = 4 if itemsize >= 4 else 16
    fwd_warps = max(1, fwd_block * chunk // (128 if itemsize >= 4 else 256))
    bwd_warps = 1 if bwd_block <= 8 else min(4, bwd_block // 4)
    only_block, only_chunk = (8, 64) if itemsize >= 4 else (4, 128)
    only_chunk = min(only_chunk, _next_power_of_2(seq))
    return dict(fwd_block_d=fwd_block, bwd_block_d=bwd_block, fwd_warps=fwd_warps, bwd_warps=bwd_warps,
                bwd_atomic_cols=int(atomic_cols),
                bwd_four_row_sums=1 if atomic_cols else default_four_row_sums(batch, width, bwd_block),
                fwd_only_block_d=only_block,
                fwd_only_chunk=only_chunk, fwd_only_warps=max(1, only_block * only_chunk // 256))


@functools.partial(jax.custom_vjp, nondiff_argnums=(9,))
def _scan(u, delta, z, bt, ct, at, d, bias, h0, options):
    # Not differentiated (prefill, evaluation): the forward-only tuning.
    y, _, final = options.kernels.forward(u, delta, z, bt, ct, at, d, bias, h0, **options.forward_only())
    return y, final


def _scan_fwd(u, delta, z, bt, ct, at, d, bias, h0, options):
    y, chunk_states, final = options.kernels.forward(u, delta, z, bt, ct, at, d, bias, h0, **options.forward())
    return (y, final), (u, delta, z, bt, ct, at, d, bias, chunk_states)


def _scan_bwd(options, residuals, cotangents):
    u, delta, z, bt, ct, at, d, bias, chunk_states = residuals
    dy, dfinal = cotangents
    du, ddelta, dz, dbt, dct, dat, dd, dbias, dh0 = options.kernels.backward(
        u, delta, z, bt, ct, at, d, bias, chunk_states, dy.astype(u.dtype), dfinal.astype(F32), **options.backward())
    if not options["has_z"]:
        dz = jnp.zeros_like(z)  # the kernel never wrote it
    # B, C are shared by all channels and A, D, bias by all batch elements and steps: reduce the
    # per-program partial sums here.
    # The barrier keeps XLA from fusing these reductions into their consumer (in the Mamba layer, the
    # concatenate of x_proj's gradient), which made them a slow loop fusion: 11.8 ms instead of ~2
    # per samba_1b layer at 8 x 4096 (H200 profile, benchmarks/HISTORY.md).
    dbt, dct = jax.lax.optimization_barrier((dbt.sum(1), dct.sum(1)))
    return (du, ddelta, dz, dbt.astype(bt.dtype), dct.astype(ct.dtype), dat.sum(0),
            dd.sum(0), dbias.sum(0), dh0)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_final_state=False, *, chunk_size: int = 64,
                   block_d: int | None = None, tuning: dict[str, int] | None = None,
                   interpret: bool | None = None, backend: str | None = None, layout: str = "channels_last"):
    """Fused selective scan.

    u, delta, z: (batch, seq, d_inner); A: (d_inner, d_state); B, C: (batch, seq, d_state);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state).
    layout="channels_first": u, delta, z and y are (batch, d_inner, seq) and B, C (batch, d_state, seq),
      mamba_ssm's own layout; the channel-major kernels then read and write them with no transposes.
    chunk_size: steps between saved states (backward memory batch*seq/chunk*d_inner*d_state f32);
      the channel-major kernels use tiles of min(chunk_size, CHANNEL_MAJOR_TILE) steps.
    block_d: channels per program, both directions (a power of two; None: `default_block_d`, or
      `default_channel_major_tuning` for the channel-major kernels).
    tuning: overrides of the defaults: fwd_block_d, bwd_block_d, fwd_warps, bwd_warps (Triton warps
      per program), and for "triton" fwd_prefetch, bwd_prefetch (steps loaded ahead, `default_tuning`);
      for the channel-major kernels also fwd_only_block_d, fwd_only_chunk, fwd_only_warps (the
      forward when it is not differentiated, `default_channel_major_tuning`) and bwd_atomic_cols
      (1: the backward sums dB and dC over channel blocks with relaxed float32 atomic adds, as
      mamba_ssm does, in a run-to-run varying order: 1.01-1.09x the speed of the partial sums and a
      ninth of their temporary memory; 0: per-block partial sums reduced by XLA, run-to-run identical;
      the default is 1 unless XLA_FLAGS has --xla_gpu_deterministic_ops, `default_atomic_cols`) and
      bwd_four_row_sums (1: the per-block dB, dC sums over channels taken 4 states at a time by warp
      shuffles where the tile is 4 channels x 32 steps on one warp, `channel_sums`; 0: state by
      state, Triton's butterfly; the default by grid size, `default_four_row_sums`).
    interpret: run the kernels in Pallas interpret mode (default: on CPU backends).
    backend: "triton_channel_major" (the default off TPU), "triton" (step by step) or "tpu" (the
      default on TPU). The channel-major kernels need a power-of-two chunk_size. On TPU,
      block_d defaults to 128 (the lane width) and chunk_size is rounded to a legal seq tile
      (`tpu_kernels.seq_tile`).
    Returns y (batch, seq, d_inner) (channels-first: (batch, d_inner, seq)) in u's dtype, and the
    final float32 state (batch, d_inner, d_state) if asked.
    """
    if layout not in ("channels_last", "channels_first"):
        raise ValueError(f"layout must be 'channels_last' or 'channels_first', got {layout!r}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if backend is None:
        backend = "tpu" if jax.default_backend() == "tpu" else "triton_channel_major"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS)}, got {backend!r}")
    channels_first = layout == "channels_first"
    if channels_first and backend != "triton_channel_major":
        # Only the channel-major kernels read (batch, d_inner, seq); the others get transposes here.
        swap = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
        out = selective_scan(swap(u), swap(delta), A, swap(B), swap(C), D, None if z is None else swap(z),
                             delta_bias, delta_softplus, initial_state, return_final_state, chunk_size=chunk_size,
                             block_d=block_d, tuning=tuning, interpret=interpret, backend=backend)
        return (swap(out[0]), out[1]) if return_final_state else swap(out)
    batch, seq, width = (u.shape[0], u.shape[2], u.shape[1]) if channels_first else u.shape
    d_state = A.shape[1]
    if backend == "tpu":
        chunk = tpu_kernels.seq_tile(chunk_size, seq, interpret)
    elif backend == "triton":
        chunk = int(min(chunk_size, seq))
    else:  # Triton tiles are powers of two; steps past the end are masked inside
        if chunk_size < 1 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two for the channel-major kernels, got {chunk_size}")
        chunk = min(chunk_size, _next_power_of_2(seq), CHANNEL_MAJOR_TILE)
    if backend == "triton_channel_major" and block_d is None:
        atomic = bool((tuning or {}).get("bwd_atomic_cols", default_atomic_cols()))  # no partials: no widening
        knobs = default_channel_major_tuning(batch, seq, width, chunk, jnp.dtype(u.dtype).itemsize, atomic)
    else:
        if block_d is None:
            block_d = 128 if backend == "tpu" else default_block_d(batch, width)
        knobs = dict(fwd_block_d=block_d, bwd_block_d=block_d)
        if backend == "triton_channel_major":
            warps = max(1, block_d * chunk // 256)
            knobs.update(fwd_warps=warps, bwd_warps=warps, bwd_atomic_cols=default_atomic_cols(),
                         bwd_four_row_sums=default_four_row_sums(batch, width, block_d),
                         fwd_only_block_d=block_d, fwd_only_chunk=chunk, fwd_only_warps=warps)
        else:
            knobs.update(default_tuning(batch, width, block_d))
    unknown = sorted(set(tuning or {}) - set(knobs))
    if unknown:
        raise ValueError(f"tuning has unknown knobs {unknown} for backend {backend!r}; it takes {sorted(knobs)}")
    knobs.update(tuning or {})
    directions = ("fwd", "bwd", "fwd_only") if backend == "triton_channel_major" else ("fwd", "bwd")
    for direction in directions:
        block = knobs[f"{direction}_block_d"]
        if block < 1 or block & (block - 1):
            raise ValueError(f"block_d must be a power of two, got {block} ({direction})")
        knobs[f"{direction}_block_d"] = min(block, _next_power_of_2(width))
    if backend == "triton_channel_major":
        only_chunk = knobs["fwd_only_chunk"]
        if only_chunk < 1 or only_chunk & (only_chunk - 1):
            raise ValueError(f"tuning fwd_only_chunk must be a power of two, got {only_chunk}")
    pad_d = -width % max(knobs[f"{direction}_block_d"] for direction in directions)
    pad_n = _next_power_of_2(d_state) - d_state  # Triton tiles are powers of two

    channel_axis = 1 if channels_first else 2

    def pad_channels(x):  # padded d_inner; zero u makes padded channels inert
        return jnp.pad(x, [(0, pad_d) if axis == channel_axis else (0, 0) for axis in range(3)]) if pad_d else x

    def state_major(x):  # (batch, seq, d_state) or channels-first (batch, d_state, seq) -> (batch, d_state_padded, seq)
        return jnp.pad(x if channels_first else jnp.swapaxes(x, 1, 2), ((0, 0), (0, pad_n), (0, 0)))

    def vector(x, fill):
        x = jnp.full((width,), fill, F32) if x is None else x.astype(F32)
        return jnp.pad(x, (0, pad_d))[None, :]

    has_z = z is not None
    at = jnp.pad(A.astype(F32).T, ((0, pad_n), (0, pad_d)))  # padded rows/columns: A = 0, state stays 0
    if initial_state is None:
        h0 = jnp.zeros((batch, d_state + pad_n, width + pad_d), F32)
    else:
        h0 = jnp.pad(jnp.swapaxes(initial_state.astype(F32), 1, 2), ((0, 0), (0, pad_n), (0, pad_d)))
    options = dict(backend=backend, chunk=chunk, softplus=bool(delta_softplus), has_z=has_z,
                   interpret=bool(interpret), **knobs)
    if channels_first:
        options["channels_first"] = True
    y, final = _scan(pad_channels(u), pad_channels(delta), pad_channels(z if has_z else u), state_major(B),
                     state_major(C), at, vector(D, 0.0), vector(delta_bias, 0.0), h0,
                     _Options(options))
    y = y[:, :width] if channels_first else y[:, :, :width]
    if not return_final_state:
        return y
    return y, jnp.swapaxes(final[:, :d_state, :width], 1, 2)


_BACKENDS = {"tpu": tpu_kernels, "triton": triton_kernels, "triton_channel_major": triton_channel_major_kernels}


class _Options(dict):
    """Static kernel options, hashable so custom_vjp can treat them as a non-differentiable argument."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    @property
    def kernels(self):
        return _BACKENDS[self["backend"]]

    def _for(self, prefix: str) -> dict:
        shared = {k: v for k, v in self.items() if k != "backend" and not k.startswith(("fwd_", "bwd_"))}
        if self["backend"] == "triton":
            shared["prefetch"] = self[f"{prefix}_prefetch"]
        return dict(shared, num_warps=self[f"{prefix}_warps"], block_d=self[f"{prefix}_block_d"])

    def forward(self) -> dict:
        return self._for("fwd")

    def forward_only(self) -> dict:
        """The forward's options when no backward follows (channel-major: its own tiles)."""
        if self["backend"] != "triton_channel_major":
            return self.forward()
        return dict(self.forward(), chunk=self["fwd_only_chunk"], block_d=self["fwd_only_block_d"],
                    num_warps=self["fwd_only_warps"])

    def backward(self) -> dict:
        options = self._for("bwd")
        if self["backend"] == "triton_channel_major":
            options["atomic_cols"] = bool(self["bwd_atomic_cols"])
            options["four_row_sums"] = bool(self["bwd_four_row_sums"])
        return options
