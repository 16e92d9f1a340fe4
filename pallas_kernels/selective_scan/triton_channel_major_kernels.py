"""Pallas (Triton backend) selective-scan kernels in channel-major layout: a parallel scan per tile.

Each program owns one batch element and `block_d` channels and walks the sequence in tiles of
`chunk` steps, running the recurrence h_t = exp(Δ_t A_n) h_{t-1} + Δ_t B_tn u_t of each state n
over a tile as one parallel scan (`linear_recurrence`, Triton's tt.scan). Tiles are
(block_d, chunk) with the step axis last and contiguous in memory, as mamba_ssm lays out
(batch, dim, seqlen). (An earlier kernel with the channels contiguous, (chunk, block_d) tiles, had
its scans cross warps and ran 2-3.5x slower than the step-by-step kernel; benchmarks/HISTORY.md.) Triton's
default layouts then give each thread a run of consecutive steps of one channel (a vector load),
so the scan is sequential inside a thread and a few warp shuffles across threads, never crossing
warps, which is mamba_ssm's own block-scan recipe. B and C are loaded already broadcast over the
channels (an index array whose rows repeat), so they arrive in the tile's layout without a
shuffle through shared memory.
  u, delta, z, y, dy: (block_d, chunk) tiles of (d, seq) blocks, transposed outside the kernel;
  B^T, C^T: (d_state, seq) blocks; A: (block_d, d_state); D, delta_bias: (block_d, 1).
The state carried from tile to tile is d_state columns of (block_d, 1). Steps past the end get
Δ = 0 (exp(ΔA) = 1, ΔBu = 0: the state passes through) and are never stored.
Callers in mamba_ssm's own layout (`channels_first`: u, delta, z, y as (batch, d, seq)) feed the
kernels directly; channels-last callers (`layouts.py`) are converted at the edges by XLA transposes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan import channel_sums, relaxed_atomics
from pallas_kernels.selective_scan.linear_recurrence import linear_recurrence

F32 = jnp.float32
LOG2E = math.log2(math.e)  # exp(x) = exp2(x log2 e): exp2 is one special-function instruction


def _softplus(x):
    # log(1 + e^x), exact to float32 above 20 where the log1p branch would overflow.
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


def _load(ref, mask=None):
    return pltriton.load(ref, mask=mask, other=0.0 if mask is not None else None).astype(F32)


class _Tile:
    """Masks and loads of the tile of steps [start, start + chunk): (block_d, chunk) unless noted."""

    def __init__(self, start, chunk, block_d, seq):
        self.step = lax.broadcasted_iota(jnp.int32, (block_d, chunk), 1)
        self.valid = self.step + start < seq
        self.start, self.chunk, self.seq = start, chunk, seq

    def rows(self, ref, offset=0):
        """Channels x steps of a (block_d, seq) ref, zero past the end (and shifted by `offset`)."""
        mask = self.step + (self.start + offset) < self.seq
        return _load(ref.at[:, pl.ds(self.start + offset, self.chunk)], mask)

    def broadcast(self, ref, n):
        """State n's values at the tile's steps, repeated over the channels, from a (d_state, seq) ref."""
        # An index array whose rows repeat: the load lands in the tile's own layout. (Loading the row
        # once and broadcasting ran at the same speed on an H200, benchmarks/HISTORY.md.)
        return _load(ref.at[jnp.int32(n), self.step + self.start], self.valid)

    def delta(self, delta_ref, bias, softplus, offset=0):
        """(pre-activation, Δ) with Δ = 0 past the sequence end."""
        pre = self.rows(delta_ref, offset) + bias
        valid = self.step + (self.start + offset) < self.seq
        return pre, jnp.where(valid, _softplus(pre) if softplus else pre, 0.0)

    def column(self, x, j):
        """Column j of x as (block_d, 1): a reduction inside each channel's threads."""
        return jnp.sum(jnp.where(self.step == j, x, 0.0), axis=1, keepdims=True)

    def store_rows(self, ref, x):
        pltriton.store(ref.at[:, pl.ds(self.start, self.chunk)], x.astype(ref.dtype), mask=self.valid)


def _forward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, a_ref, d_ref, bias_ref, h0_ref,
                    y_ref, chunk_states_ref, final_ref, *, seq, chunk, softplus, has_z):
    block_d, d_state = a_ref.shape
    a2 = [_load(a_ref.at[:, pl.ds(n, 1)]) * LOG2E for n in range(d_state)]  # (block_d, 1) each
    d_skip, bias = _load(d_ref), _load(bias_ref)

    def tile_body(c, h):
        tile = _Tile(c * chunk, chunk, block_d, seq)
        u = tile.rows(u_ref)
        _, dt = tile.delta(delta_ref, bias, softplus)
        dtu = dt * u
        y = d_skip * u
        carried = []
        for n in range(d_state):
            # The state entering tile c. (Storing all d_state columns as one (block_d, d_state) tile
            # halves the barriers but ran the forward 0.57-0.79x as fast: benchmarks/HISTORY.md, 2026-12-07.)
            pltriton.store(chunk_states_ref.at[c, :, pl.ds(n, 1)], h[n])
            decay = jnp.exp2(dt * a2[n])
            drive = dtu * tile.broadcast(bt_ref, n)
            drive = jnp.where(tile.step == 0, drive + decay * h[n], drive)  # the carried state enters step 0
            states = linear_recurrence(decay, drive, axis=1)
            y = y + states * tile.broadcast(ct_ref, n)
            carried.append(tile.column(states, chunk - 1))
        if has_z:
            z = tile.rows(z_ref)
            y = y * z * _sigmoid(z)
        tile.store_rows(y_ref, y)
        return tuple(carried)

    h0 = tuple(_load(h0_ref.at[:, pl.ds(n, 1)]) for n in range(d_state))
    h = lax.fori_loop(0, chunk_states_ref.shape[0], tile_body, h0)
    for n in range(d_state):
        pltriton.store(final_ref.at[:, pl.ds(n, 1)], h[n])


def _backward_kernel(u_ref, delta_ref, z_ref, bt_ref, ct_ref, a_ref, d_ref, bias_ref, chunk_states_ref,
                     dy_ref, dfinal_ref, *out_refs, seq, chunk, softplus, has_z, atomic_cols, four_rows,
                     interpret):
    if atomic_cols:  # the zero accumulators come in as inputs aliased to the dB, dC outputs
        out_refs = out_refs[2:]
    du_ref, ddelta_ref, dz_ref, dbt_ref, dct_ref, da_ref, dd_ref, dbias_ref, dh0_ref = out_refs
    block_d, d_state = a_ref.shape
    a = [_load(a_ref.at[:, pl.ds(n, 1)]) for n in range(d_state)]
    d_skip, bias = _load(d_ref), _load(bias_ref)
    num_tiles = chunk_states_ref.shape[0]
    # dB, dC of 4 states at a time summed over the channels by `channel_sums`' shuffles, else one by one.
    channel = channel_sums.channel_index(chunk) if four_rows else None

    def tile_body(i, carry):
        # dh_in[n]: d loss / d h at this tile's last step from later steps; da[n]: dA columns so far.
        dh_in, da, dd_acc, dbias_acc = carry
        c = num_tiles - 1 - i
        tile = _Tile(c * chunk, chunk, block_d, seq)
        valid_steps = lax.broadcasted_iota(jnp.int32, (1, chunk), 1) + tile.start < seq
        u = tile.rows(u_ref)
        pre, dt = tile.delta(delta_ref, bias, softplus)
        _, dt_next = tile.delta(delta_ref, bias, softplus, offset=1)  # Δ_{t+1}, for the adjoint
        dtu = dt * u
        dy = tile.rows(dy_ref)
        if has_z:
            z = tile.rows(z_ref)
            sig = _sigmoid(z)
            dy_gate = dy * z * sig  # dy through the silu(z) gate
        else:
            dy_gate = dy
        y_pre = d_skip * u
        du = dy_gate * d_skip
        d_dt = jnp.zeros_like(u)
        dh_out, da_out = [], []
        pending_db, pending_dc = [], []  # earlier states' products or pair sums, waiting (four_rows)
        for n in range(d_state):
            decay = jnp.exp2(dt * (a[n] * LOG2E))
            b_row, c_row = tile.broadcast(bt_ref, n), tile.broadcast(ct_ref, n)
            drive = dtu * b_row
            entering = _load(chunk_states_ref.at[c, :, pl.ds(n, 1)])
            states = linear_recurrence(decay, jnp.where(tile.step == 0, drive + decay * entering, drive), axis=1)
            y_pre = y_pre + states * c_row
            # Adjoint: dh_t = C_t dy_t + exp(Δ_{t+1} A) dh_{t+1}; the last step takes dh_in instead.
            source = dy_gate * c_row
            source = jnp.where(tile.step == chunk - 1, source + dh_in[n], source)
            decay_next = jnp.exp2(dt_next * (a[n] * LOG2E))
            # (Inline-PTX warp shuffles in place of Triton's reverse scan, 6 shuffles against 66,
            # ran 0.84-1.01x as fast in two A/B runs and were dropped: benchmarks/HISTORY.md, 2026-12-07.)
            dh = linear_recurrence(decay_next, source, axis=1, reverse=True)
            # h_t = decay h_{t-1} + drive: decay * h_{t-1} = states - drive; d/dΔ exp(ΔA) = A exp(ΔA).
            d_decayed = dh * (states - drive)  # d loss / d(ΔA)
            da_out.append(da[n] + jnp.sum(d_decayed * dt, axis=1, keepdims=True))
            dh_b = dh * b_row
            d_dt = d_dt + d_decayed * a[n] + dh_b * u
            du = du + dh_b * dt
            if four_rows:
                _four_rows(dbt_ref, n, tile, pending_db, dh * dtu, channel, atomic_cols, interpret)
                _four_rows(dct_ref, n, tile, pending_dc, states * dy_gate, channel, atomic_cols, interpret)
            else:
                _store_col(dbt_ref, n, tile, jnp.sum(dh * dtu, axis=0, keepdims=True), valid_steps, atomic_cols)
                _store_col(dct_ref, n, tile, jnp.sum(states * dy_gate, axis=0, keepdims=True), valid_steps,
                           atomic_cols)
            dh_out.append(tile.column(dh * decay, 0))  # into the previous tile's last state
        if has_z:  # y = y_pre * silu(z)
            tile.store_rows(dz_ref, dy * y_pre * sig * (1.0 + z * (1.0 - sig)))
        d_pre = jnp.where(tile.valid, d_dt * _sigmoid(pre) if softplus else d_dt, 0.0)
        tile.store_rows(du_ref, du)
        tile.store_rows(ddelta_ref, d_pre)
        dd_acc = dd_acc + jnp.sum(dy_gate * u, axis=1, keepdims=True)
        dbias_acc = dbias_acc + jnp.sum(d_pre, axis=1, keepdims=True)
        return tuple(dh_out), tuple(da_out), dd_acc, dbias_acc

    zeros = jnp.zeros((block_d, 1), F32)
    dfinal = tuple(_load(dfinal_ref.at[:, pl.ds(n, 1)]) for n in range(d_state))
    dh, da, dd_acc, dbias_acc = lax.fori_loop(0, num_tiles, tile_body, (dfinal, (zeros,) * d_state, zeros, zeros))
    for n in range(d_state):
        pltriton.store(dh0_ref.at[:, pl.ds(n, 1)], dh[n])
        pltriton.store(da_ref.at[:, pl.ds(n, 1)], da[n])
    pltriton.store(dd_ref, dd_acc)
    pltriton.store(dbias_ref, dbias_acc)


def _four_rows(ref, n, tile, pending, products, channel, atomic, interpret):
    """Take state n's (4, chunk) dB or dC products; after every fourth state, store rows n-3..n of ref
    (d_state, seq), each summed over the 4 channels (`channel_sums`). pending: what waits meanwhile.
    atomic: added into the accumulator shared by all channel blocks (see `_store_col`; steps past the
    end add zeros: Δ and dy are zero there)."""
    if n % 2:  # halve as soon as a pair is in: fewer values stay live
        products = channel_sums.pair_sums(pending.pop(), products, channel, interpret=interpret)
    pending.append(products)
    if n % 4 == 3:
        sums = channel_sums.quad_sums(*pending, channel, interpret=interpret)
        pending.clear()
        window = (pl.ds(n - 3, 4), pl.ds(tile.start, tile.chunk))
        if atomic:
            relaxed_atomics.add_relaxed(ref, window, sums)
        else:
            pltriton.store(ref.at[window], sums, mask=tile.valid)


def _store_col(ref, n, tile, values, valid, atomic):
    """State n's (1, chunk) dB or dC sums over this program's channels, at the tile's steps.

    The row is stored from the tile's own (block_d, chunk) layout: broadcast back over the channels
    and written through an index array whose rows all point at the same steps. Its addresses run
    along the steps as the tile's loads do, so Triton keeps the tile's layout for the store. (A plain
    (1, chunk) row store had Triton convert each of the 32 rows per tile to a one-step-per-lane
    layout through shared memory with a barrier; benchmarks/HISTORY.md, 2026-12-06.)
    atomic (the default): added into one (d_state, padded seq) accumulator shared by every channel
    block, as mamba_ssm does, instead of stored as this block's partial sums for XLA to reduce
    afterwards (2.1 GB written and read again at 4 x 4096 x 4096 with 4 channels per block). The
    float32 sum order then varies from run to run. The accumulator is padded to whole tiles, so no
    mask is needed (interpret mode has no masked atomics); steps past the end add zeros. With
    Pallas' acquire-release adds (a full fence after each, MEMBAR.ALL.GPU in the SASS) this was
    1.6-3.8x slower than the partials on an H200 (benchmarks/HISTORY.md, 2026-12-05); the adds are relaxed
    now (`relaxed_atomics`, REDG without fences, as mamba_ssm's atomicAdd), and forward+backward is
    1.01-1.09x the partials' speed on an H100 (interleaved A/B, 2026-12-07).
    """
    if atomic:
        window = (pl.ds(n, 1), pl.ds(tile.start, values.shape[1]))
        relaxed_atomics.add_relaxed(ref, window, jnp.where(valid, values, 0.0))
        return
    # Every row holds the same sums, so every row's lanes may store them: duplicate addresses with
    # equal values. (Masking all but the first row would also be right on a GPU, but interpret mode
    # writes masked-off lanes' old values back, and with duplicate addresses those can win.)
    rows = jnp.broadcast_to(values, tile.step.shape)
    pltriton.store(ref.at[jnp.int32(n), tile.step + tile.start], rows, mask=tile.valid)


def _specs(seq, d_state, block_d, num_chunks, chunk):
    """Channel-major blocks: row (batch, d, seq), col (batch, d_state, seq), param (d, d_state),
    vec (d, 1), state (batch, d, d_state), chunks (batch, num_chunks, d, d_state),
    partial_col (batch, d_blocks, d_state, seq), accumulated_col (batch, d_state, num_chunks * chunk)
    shared by all blocks, vec_out (batch, d, 1)."""
    return {
        "row": pl.BlockSpec((None, block_d, seq), lambda b, j: (b, j, 0)),
        "col": pl.BlockSpec((None, d_state, seq), lambda b, j: (b, 0, 0)),
        "param": pl.BlockSpec((block_d, d_state), lambda b, j: (j, 0)),
        "vec": pl.BlockSpec((block_d, 1), lambda b, j: (j, 0)),
        "state": pl.BlockSpec((None, block_d, d_state), lambda b, j: (b, j, 0)),
        "chunks": pl.BlockSpec((None, num_chunks, block_d, d_state), lambda b, j: (b, 0, j, 0)),
        "partial_col": pl.BlockSpec((None, None, d_state, seq), lambda b, j: (b, j, 0, 0)),
        "accumulated_col": pl.BlockSpec((None, d_state, num_chunks * chunk), lambda b, j: (b, 0, 0)),
        "vec_out": pl.BlockSpec((None, block_d, 1), lambda b, j: (b, j, 0)),
    }


def _swap(x):
    return jnp.swapaxes(x, 1, 2)  # (batch, seq, d) <-> (batch, d, seq)


_STATIC = ("chunk", "block_d", "softplus", "has_z", "num_warps", "interpret", "channels_first")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(u, delta, z, bt, ct, at, d, bias, h0, *, chunk, block_d, softplus, has_z, num_warps, interpret,
            channels_first=False):
    """Contract of `triton_calls.forward_call`: y (batch, seq, d), the states entering each chunk
    (batch, num_chunks, d, d_state; only `backward` reads them), and the final state (batch, d_state, d).
    channels_first: u, delta, z and y are (batch, d, seq) instead (no transposes)."""
    edge = (lambda x: x) if channels_first else _swap  # to and from the kernels' (batch, d, seq)
    batch, width, seq = u.shape if channels_first else _swap(u).shape
    d_state = at.shape[0]
    num_chunks = pl.cdiv(seq, chunk)
    s = _specs(seq, d_state, block_d, num_chunks, chunk)
    kernel = functools.partial(_forward_kernel, seq=seq, chunk=chunk, softplus=softplus, has_z=has_z)
    y, chunk_states, final = pl.pallas_call(
        kernel,
        grid=(batch, width // block_d),
        in_specs=[s["row"], s["row"], s["row"], s["col"], s["col"], s["param"], s["vec"], s["vec"], s["state"]],
        out_specs=[s["row"], s["chunks"], s["state"]],
        out_shape=[jax.ShapeDtypeStruct((batch, width, seq), u.dtype),
                   jax.ShapeDtypeStruct((batch, num_chunks, width, d_state), F32),
                   jax.ShapeDtypeStruct((batch, width, d_state), F32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="selective_scan_cm_fwd",
    )(edge(u), edge(delta), edge(z), bt, ct, at.T, d.T, bias.T,
      jnp.swapaxes(h0, 1, 2))
    return edge(y), chunk_states, jnp.swapaxes(final, 1, 2)


@functools.partial(jax.jit, static_argnames=(*_STATIC, "atomic_cols", "four_row_sums"))
def backward(u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal, *, chunk, block_d, softplus, has_z,
             num_warps, interpret, channels_first=False, atomic_cols=False, four_row_sums=True):
    """Gradients in the layouts of `layouts.backward_out_shapes` (per-block partials reduced by the caller);
    channels_first: u, delta, z, dy, du, ddelta, dz are (batch, d, seq).
    atomic_cols: dB and dC summed over channel blocks in the kernel (`_store_col`); their partials then
    have one block.
    four_row_sums: dB and dC summed over the block's channels 4 states at a time by `channel_sums`'
    shuffles where it applies (4 channels x 32 steps on one warp; with atomic_cols too), else state by
    state by Triton's butterfly."""
    d_state = at.shape[0]
    four_rows = four_row_sums and channel_sums.applies(block_d, chunk, num_warps, d_state)
    edge = (lambda x: x) if channels_first else _swap  # to and from the kernels' (batch, d, seq)
    batch, width, seq = u.shape if channels_first else _swap(u).shape
    blocks = width // block_d
    num_chunks = chunk_states.shape[1]
    s = _specs(seq, d_state, block_d, num_chunks, chunk)
    kernel = functools.partial(_backward_kernel, seq=seq, chunk=chunk, softplus=softplus, has_z=has_z,
                               atomic_cols=atomic_cols, four_rows=four_rows, interpret=interpret)
    row = lambda x: jax.ShapeDtypeStruct((batch, width, seq), x.dtype)  # noqa: E731
    state = jax.ShapeDtypeStruct((batch, width, d_state), F32)
    vec = jax.ShapeDtypeStruct((batch, width, 1), F32)
    inputs = [edge(u), edge(delta), edge(z), bt, ct, at.T, d.T, bias.T, chunk_states, edge(dy),
              jnp.swapaxes(dfinal, 1, 2)]
    in_specs = [s["row"], s["row"], s["row"], s["col"], s["col"], s["param"], s["vec"], s["vec"], s["chunks"],
                s["row"], s["state"]]
    if atomic_cols:  # zero accumulators, updated in place
        col_spec = s["accumulated_col"]
        col = jax.ShapeDtypeStruct((batch, d_state, num_chunks * chunk), F32)
        inputs += [jnp.zeros(col.shape, F32)] * 2
        in_specs += [col_spec] * 2
        aliases = {len(inputs) - 2: 3, len(inputs) - 1: 4}
    else:
        col_spec = s["partial_col"]
        col = jax.ShapeDtypeStruct((batch, blocks, d_state, seq), F32)
        aliases = {}
    du, ddelta, dz, dbt, dct, da, dd, dbias, dh0 = pl.pallas_call(
        kernel,
        grid=(batch, blocks),
        in_specs=in_specs,
        out_specs=[s["row"], s["row"], s["row"], col_spec, col_spec, s["state"], s["vec_out"],
                   s["vec_out"], s["state"]],
        out_shape=[row(u), row(delta), row(z), col, col, state, vec, vec, state],
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="selective_scan_cm_bwd",
    )(*inputs)
    if atomic_cols:  # one "block" of partials, cut to the sequence
        dbt, dct = dbt[:, None, :, :seq], dct[:, None, :, :seq]
    to_state = functools.partial(jnp.swapaxes, axis1=1, axis2=2)  # (batch, d, d_state) -> (batch, d_state, d)
    return (edge(du), edge(ddelta), edge(dz), dbt, dct, to_state(da),
            to_state(dd), to_state(dbias), to_state(dh0))
