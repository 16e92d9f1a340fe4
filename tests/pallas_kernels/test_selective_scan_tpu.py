"""The Mosaic TPU selective-scan kernels, in Pallas TPU interpret mode on CPU, against `reference`."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.selective_scan import selective_scan as fused
from pallas_kernels.selective_scan import tpu_kernels
from samba_jax import ops
from tests.pallas_kernels.test_selective_scan import assert_close, make_inputs, values_and_grads

ALL = ("D", "z", "delta_bias", "initial_state")
CASES = [  # (batch, seq, width, d_state, seq_tile, which optional inputs, softplus)
    (2, 1, 40, 16, 8, ALL, True),  # one padded tile; width 40 -> one 64-wide block
    (1, 7, 40, 5, 8, ("D", "initial_state"), False),  # d_state padded 5 -> 8, no z
    (1, 129, 136, 16, 16, ALL, True),  # 9 tiles, the last one step long; two 128-wide blocks
    (2, 129, 40, 5, 8, ("z", "delta_bias"), True),  # 17 tiles, no D, zero initial state
]


@pytest.mark.parametrize("batch,seq,width,d_state,tile,optional,softplus", CASES)
def test_tpu_kernel_matches_reference_values_and_every_gradient(batch, seq, width, d_state, tile, optional,
                                                                softplus):
    full = make_inputs(batch, seq, width, d_state, seed=seq)
    args = {k: v for k, v in full.items() if k in ("u", "delta", "A", "B", "C") or k in optional}
    if not softplus:  # without softplus the caller supplies Δ itself, positive (a negative Δ diverges)
        args["delta"] = 0.2 * jnp.abs(args["delta"])
    # The loss includes sin(final state), so the final-state cotangent is exercised too.
    loss_ref, grads_ref = values_and_grads(ops.selective_scan, args, dict(delta_softplus=softplus,
                                                                          implementation="reference"))
    loss, grads = values_and_grads(fused, args, dict(delta_softplus=softplus, chunk_size=tile, backend="tpu"))
    assert_close(loss, loss_ref, 1e-5, "loss")
    for name in args:
        assert_close(grads[name], grads_ref[name], 2e-5, name)


def test_backend_tpu_routes_to_the_mosaic_kernels_and_default_off_tpu_is_channel_major():
    args = make_inputs(1, 16, 16, 4)
    def names(**kw):
        return str(jax.make_jaxpr(lambda a: fused(**a, chunk_size=8, **kw))(args))
    assert "selective_scan_tpu_fwd" in names(backend="tpu")
    assert "selective_scan_tpu_fwd" not in names() and "selective_scan_cm_fwd" in names()
    assert "selective_scan_fwd" in names(backend="triton")


def test_seq_tile_is_sublane_aligned_and_lane_aligned_on_hardware():
    assert tpu_kernels.seq_tile(64, 7, interpret=True) == 8
    assert tpu_kernels.seq_tile(12, 129, interpret=True) == 16
    assert tpu_kernels.seq_tile(64, 4096, interpret=False) == 128  # B^T/C^T tiles put seq on lanes
    assert tpu_kernels.seq_tile(512, 300, interpret=False) == 304  # one tile spanning the padded seq
