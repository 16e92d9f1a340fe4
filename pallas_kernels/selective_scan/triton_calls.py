"""The `pallas_call`s shared by both Triton selective-scan kernels (step-by-step and tile-scan).

Grid (batch, d_blocks); every program sees its batch element's whole sequence for `block_d`
channels. Layouts, keyed by name:
  row (batch, seq, d), col (batch, d_state, seq), param (d_state, d), vec (1, d),
  state (batch, d_state, d), chunks (batch, num_chunks, d_state, d),
  partial_col (batch, d_blocks, d_state, seq), vec_out (batch, 1, d).
A kernel module supplies only its kernel bodies; the outputs follow `layouts.backward_out_shapes`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.selective_scan import layouts

F32 = jnp.float32


def _specs(seq, d_state, block_d, num_chunks):
    return {
        "row": pl.BlockSpec((None, seq, block_d), lambda b, j: (b, 0, j)),
        "col": pl.BlockSpec((None, d_state, seq), lambda b, j: (b, 0, 0)),
        "param": pl.BlockSpec((d_state, block_d), lambda b, j: (0, j)),
        "vec": pl.BlockSpec((1, block_d), lambda b, j: (0, j)),
        "state": pl.BlockSpec((None, d_state, block_d), lambda b, j: (b, 0, j)),
        "chunks": pl.BlockSpec((None, num_chunks, d_state, block_d), lambda b, j: (b, 0, 0, j)),
        "partial_col": pl.BlockSpec((None, None, d_state, seq), lambda b, j: (b, j, 0, 0)),
        "vec_out": pl.BlockSpec((None, 1, block_d), lambda b, j: (b, 0, j)),
    }


def forward_call(kernel, u, delta, z, bt, ct, at, d, bias, h0, *, chunk, block_d, num_warps, interpret):
    """kernel(u, delta, z, bt, ct, at, d, bias, h0, y, chunk_states, final refs). Returns y (batch, seq,
    d) in u's dtype, the states entering each chunk (batch, num_chunks, d_state, d) f32 and the final state."""
    batch, seq, width = u.shape
    d_state = at.shape[0]
    num_chunks = pl.cdiv(seq, chunk)
    s = _specs(seq, d_state, block_d, num_chunks)
    return pl.pallas_call(
        kernel,
        grid=(batch, width // block_d),
        in_specs=[s["row"], s["row"], s["row"], s["col"], s["col"], s["param"], s["vec"], s["vec"], s["state"]],
        out_specs=[s["row"], s["chunks"], s["state"]],
        out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                   jax.ShapeDtypeStruct((batch, num_chunks, d_state, width), F32),
                   jax.ShapeDtypeStruct((batch, d_state, width), F32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="selective_scan_fwd",
    )(u, delta, z, bt, ct, at, d, bias, h0)


def backward_call(kernel, u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal, *, block_d, num_warps,
                  interpret, scratch_rows: int = 0):
    """kernel(inputs..., the 9 gradient refs of `layouts.backward_out_shapes`[, scratch]). With
    scratch_rows, each program also gets a (scratch_rows, d_state, block_d) f32 scratch buffer."""
    batch, seq, width = u.shape
    d_state = at.shape[0]
    blocks = width // block_d
    s = _specs(seq, d_state, block_d, chunk_states.shape[1])
    out_specs = [s["row"], s["row"], s["row"], s["partial_col"], s["partial_col"], s["state"], s["vec_out"],
                 s["vec_out"], s["state"]]
    out_shape = layouts.backward_out_shapes(u, delta, z, blocks, d_state, seq)
    if scratch_rows:
        out_specs.append(pl.BlockSpec((None, None, scratch_rows, d_state, block_d), lambda b, j: (b, j, 0, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((batch, blocks, scratch_rows, d_state, block_d), F32))
    outs = pl.pallas_call(
        kernel,
        grid=(batch, blocks),
        in_specs=[s["row"], s["row"], s["row"], s["col"], s["col"], s["param"], s["vec"], s["vec"], s["chunks"],
                  s["row"], s["state"]],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="selective_scan_bwd",
    )(u, delta, z, bt, ct, at, d, bias, chunk_states, dy, dfinal)
    return outs[:9]  # without the scratch buffer
