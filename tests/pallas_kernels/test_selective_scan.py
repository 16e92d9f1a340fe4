"""The fused Pallas selective scan (interpret mode on CPU) against the `reference` lax.scan."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from pallas_kernels.selective_scan import selective_scan as fused
from samba_jax import ops


def make_inputs(batch, seq, width, d_state, seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 9)
    a_log = jnp.log(jnp.arange(1, d_state + 1, dtype=jnp.float32)) + 0.1 * jax.random.normal(k[2], (width, d_state))
    return dict(
        u=jax.random.normal(k[0], (batch, seq, width), dtype),
        delta=(0.5 * jax.random.normal(k[1], (batch, seq, width))).astype(dtype),
        A=-jnp.exp(a_log),
        B=jax.random.normal(k[3], (batch, seq, d_state), dtype),
        C=jax.random.normal(k[4], (batch, seq, d_state), dtype),
        D=jax.random.normal(k[5], (width,)),
        z=jax.random.normal(k[6], (batch, seq, width), dtype),
        delta_bias=0.5 * jax.random.normal(k[7], (width,)) - 2.0,
        initial_state=jax.random.normal(k[8], (batch, width, d_state)),
    )


def scalar_loss(scan, args, options):
    y, final = scan(**args, **options, return_final_state=True)
    weights = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y.astype(jnp.float32) * weights) + 0.3 * jnp.sum(jnp.sin(final))


def values_and_grads(scan, args, options):
    return jax.value_and_grad(lambda a: scalar_loss(scan, a, options))(args)


def assert_close(got, want, rtol, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.abs(want).max() + 1e-6
    assert np.abs(got - want).max() <= rtol * scale, (name, np.abs(got - want).max(), scale)


CASES = [  # (batch, seq, width, d_state, chunk, which optional inputs, softplus)
    (2, 1, 40, 16, 8, ("D", "z", "delta_bias", "initial_state"), True),
    (1, 7, 24, 16, 4, ("D", "z", "delta_bias", "initial_state"), True),
    (2, 129, 40, 16, 16, ("D", "z", "delta_bias"), True),
    (1, 129, 136, 5, 32, ("z", "initial_state"), False),
    (1, 33, 48, 16, 64, (), False),
    (1, 1000, 16, 16, 64, ("D", "z", "delta_bias", "initial_state"), True),
]


@pytest.mark.parametrize("backend", ["triton", "triton_channel_major"])
@pytest.mark.parametrize("batch,seq,width,d_state,chunk,optional,softplus", CASES)
def test_fused_matches_reference_values_and_every_gradient(batch, seq, width, d_state, chunk, optional, softplus,
                                                           backend):
    full = make_inputs(batch, seq, width, d_state)
    args = {k: v for k, v in full.items() if k in ("u", "delta", "A", "B", "C") or k in optional}
    if not softplus:  # without softplus the caller supplies Δ itself, positive (a negative Δ diverges)
        args["delta"] = 0.2 * jnp.abs(args["delta"])
    loss_ref, grads_ref = values_and_grads(ops.selective_scan, args, dict(delta_softplus=softplus,
                                                                          implementation="reference"))
    loss, grads = values_and_grads(fused, args, dict(delta_softplus=softplus, chunk_size=chunk, block_d=16,
                                                     backend=backend))
    assert_close(loss, loss_ref, 1e-5, "loss")
    for name in args:
        assert_close(grads[name], grads_ref[name], 2e-5, name)


def channels_first(args):
    """mamba_ssm's layout: (batch, d_inner, seq) and (batch, d_state, seq) for the per-step inputs."""
    per_step = ("u", "delta", "z", "B", "C")
    return {k: jnp.swapaxes(v, 1, 2) if k in per_step else v for k, v in args.items()}


@pytest.mark.parametrize("backend", ["triton_channel_major", "triton"])
@pytest.mark.parametrize("batch,seq,width,chunk", [(2, 129, 40, 16), (1, 7, 24, 4)])
def test_channels_first_layout_matches_reference_values_and_every_gradient(batch, seq, width, chunk, backend):
    args = make_inputs(batch, seq, width, 16)
    loss_ref, grads_ref = values_and_grads(ops.selective_scan, args, dict(delta_softplus=True,
                                                                          implementation="reference"))
    def scan(**kwargs):  # y back to channels-last, so the loss weights the same elements
        y, final = fused(**kwargs, layout="channels_first")
        return jnp.swapaxes(y, 1, 2), final

    # The channel-major kernels read this layout as is; "triton" gets transposes in the wrapper.
    loss, grads = values_and_grads(scan, channels_first(args), dict(delta_softplus=True, chunk_size=chunk,
                                                                    block_d=16, backend=backend))
    grads = channels_first(grads)  # back to channels-last to compare
    assert_close(loss, loss_ref, 1e-5, "loss")
    for name in args:
        assert_close(grads[name], grads_ref[name], 2e-5, name)


def transposed_shapes(jaxpr):
    """Input shapes of every transpose outside the kernels, recursing into jit, custom_vjp, ... bodies."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "transpose":
            shapes.append(tuple(eqn.invars[0].aval.shape))
        if eqn.primitive.name == "pallas_call":
            continue
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    shapes += transposed_shapes(sub)
    return shapes


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_only_channels_last_calls_pay_sequence_sized_transposes(layout):
    args = make_inputs(1, 64, 32, 16)
    args = channels_first(args) if layout == "channels_first" else args
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(jnp.sin(fused(
        **a, delta_softplus=True, chunk_size=16, backend="triton_channel_major", layout=layout)))))(args)
    # Transposes of the (batch, d_inner, d_state) states and (d_inner, d_state) A are cheap; the
    # (batch, seq, d_inner) ones are what channels-last pays (u, delta, z, y; u, delta, z, dy, du, ddelta, dz).
    sequence_sized = [shape for shape in transposed_shapes(jaxpr.jaxpr) if set(shape) >= {64, 32}]
    if layout == "channels_first":
        assert not sequence_sized, sequence_sized
    else:  # the test can see them
        assert len(sequence_sized) >= 11, sequence_sized


def test_unknown_layout_is_named():
    with pytest.raises(ValueError, match="layout"):
        fused(**make_inputs(1, 8, 16, 16), layout="batch_major")


@pytest.mark.parametrize("dtype,seq", [(jnp.float32, 300), (jnp.bfloat16, 300), (jnp.float32, 5)])
def test_forward_only_tiles_match_reference(dtype, seq):
    """Undifferentiated calls scan 64- or 128-step tiles (not the backward's 32): ragged ends and a
    sequence shorter than one tile."""
    args = make_inputs(2, seq, 24, 16, dtype=dtype)
    module = importlib.import_module("pallas_kernels.selective_scan.selective_scan")
    knobs = module.default_channel_major_tuning(2, seq, 24, 32, jnp.dtype(dtype).itemsize)
    assert knobs["fwd_only_chunk"] == min(64 if dtype == jnp.float32 else 128, module._next_power_of_2(seq))
    y, final = fused(**args, delta_softplus=True, return_final_state=True, backend="triton_channel_major")
    f32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    want, want_final = ops.selective_scan(**f32, delta_softplus=True, return_final_state=True,
                                          implementation="reference")
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2
    assert_close(y, want, tolerance, "y")
    assert_close(final, want_final, tolerance, "final state")


def test_forward_only_tuning_is_validated():
    with pytest.raises(ValueError, match="fwd_only_chunk"):
        fused(**make_inputs(1, 8, 16, 16), backend="triton_channel_major", tuning=dict(fwd_only_chunk=48))


@pytest.mark.parametrize("backend", ["triton_channel_major", "triton"])
def test_a_misspelt_tuning_knob_is_named_not_ignored(backend):
    with pytest.raises(ValueError, match="fwd_blok_d.*fwd_block_d"):
        fused(**make_inputs(1, 8, 16, 16), backend=backend, tuning=dict(fwd_blok_d=8))


def test_dispatcher_routes_pallas_to_the_fused_kernel():
    args = make_inputs(1, 20, 32, 16)
    y = ops.selective_scan(**args, delta_softplus=True, implementation="pallas", chunk_size=8)
    want = ops.selective_scan(**args, delta_softplus=True, implementation="reference")
    assert_close(y, want, 1e-5)


def test_bfloat16_inputs_within_1e2_of_float32_reference():
    args = make_inputs(2, 50, 32, 16, dtype=jnp.bfloat16)
    y = fused(**args, delta_softplus=True, chunk_size=16)
    assert y.dtype == jnp.bfloat16
    f32 = {k: v.astype(jnp.float32) for k, v in args.items()}
    assert_close(y, ops.selective_scan(**f32, delta_softplus=True, implementation="reference"), 1e-2)
    grads = jax.grad(lambda a: scalar_loss(fused, a, dict(delta_softplus=True, chunk_size=16)))(args)
    grads_ref = jax.grad(lambda a: scalar_loss(ops.selective_scan, a, dict(delta_softplus=True,
                                                                            implementation="reference")))(f32)
    for name in ("u", "delta", "B", "C", "A", "D"):
        assert_close(grads[name], grads_ref[name], 3e-2, name)


def test_gradient_check_catches_a_perturbed_input():
    args = make_inputs(1, 30, 16, 16)
    options = dict(delta_softplus=True, implementation="reference")
    grads_ref = jax.grad(lambda a: scalar_loss(ops.selective_scan, a, options))(args)
    perturbed = dict(args, C=args["C"].at[0, 17, 3].add(0.05))
    grads = jax.grad(lambda a: scalar_loss(fused, a, dict(delta_softplus=True, chunk_size=8)))(perturbed)
    with pytest.raises(AssertionError):
        for name in args:
            assert_close(grads[name], grads_ref[name], 2e-5, name)


def intermediate_sizes(jaxpr) -> list[int]:
    """Element counts of every equation's outputs, recursing into sub-jaxprs except a kernel's body."""
    sizes = []
    for eqn in jaxpr.eqns:
        sizes += [v.aval.size for v in eqn.outvars if hasattr(v.aval, "size")]
        if eqn.primitive.name == "pallas_call":
            continue  # its body is the kernel, on chip
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax_core.Jaxpr):
                    sizes += intermediate_sizes(sub)
    return sizes


def gradient_sizes(scan, seq, **options):
    """What the traced gradient holds outside the kernels (no compilation), batch 2, d_inner 64, d_state 16."""
    args = make_inputs(2, seq, 64, 16)
    return intermediate_sizes(jax.make_jaxpr(jax.grad(lambda a: scalar_loss(scan, a, options)))(args).jaxpr)


@pytest.mark.parametrize("atomic", [1, 0], ids=["atomic", "partials"])
def test_no_state_sized_tensor_in_forward_or_backward_and_memory_linear_in_seq(atomic):
    tuning = dict(bwd_atomic_cols=atomic)
    small, large = (gradient_sizes(fused, seq, delta_softplus=True, tuning=tuning) for seq in (512, 1024))
    states = 2 * 1024 * 64 * 16  # (batch, seq, d_inner, d_state) at the larger seq
    # Largest with atomic adds (the default): the per-step inputs and outputs (batch, seq, d_inner), a
    # sixteenth of that; with partial sums, the backward's dB, dC partials (batch, d_inner / 4, d_state, seq).
    assert max(large) <= (states // 16 if atomic else states // 4), max(large)
    assert 1.9 <= sum(large) / sum(small) <= 2.1, (sum(small), sum(large))


def test_the_memory_measure_catches_a_scan_that_holds_every_state():
    # The associative scan holds (batch, seq, d_inner, d_state) arrays: the check above must see them.
    sizes = gradient_sizes(ops.selective_scan, 512, delta_softplus=True, implementation="associative")
    assert max(sizes) >= 2 * 512 * 64 * 16


@pytest.mark.parametrize("backend,tuning", [("triton_channel_major", dict(fwd_warps=1, bwd_warps=1)),
                                            ("triton_channel_major", dict(fwd_block_d=8, bwd_block_d=32,
                                                                          fwd_warps=2, bwd_warps=4)),
                                            ("triton_channel_major", dict(bwd_atomic_cols=1)),
                                            ("triton_channel_major", dict(bwd_atomic_cols=1, bwd_block_d=2)),
                                            ("triton_channel_major", dict(bwd_atomic_cols=0, bwd_block_d=8)),
                                            ("triton_channel_major", dict(bwd_atomic_cols=0)),  # four-row sums
                                            ("triton_channel_major", dict(bwd_atomic_cols=0, bwd_four_row_sums=0)),
                                            ("triton", dict(fwd_prefetch=0, bwd_prefetch=0)),
                                            ("triton", dict(fwd_prefetch=1, bwd_prefetch=3, fwd_warps=2))])
def test_kernel_variants_and_tuning_do_not_change_results(backend, tuning):
    args = make_inputs(2, 45, 24, 16, seed=3)
    options = dict(delta_softplus=True, implementation="reference")
    loss_ref, grads_ref = values_and_grads(ops.selective_scan, args, options)
    loss, grads = values_and_grads(fused, args, dict(delta_softplus=True, chunk_size=16, tuning=tuning,
                                                     backend=backend))
    assert_close(loss, loss_ref, 1e-5)
    for name in args:
        assert_close(grads[name], grads_ref[name], 2e-5, name)


def test_channel_major_backward_widens_its_block_to_keep_partials_in_budget(monkeypatch):
    module = importlib.import_module("pallas_kernels.selective_scan.selective_scan")  # not the function
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    # The partials' layout (bwd_atomic_cols=0); the default adds dB, dC atomically instead.
    assert module.default_channel_major_tuning(4, 4096, 4096, 32)["bwd_atomic_cols"] == 1
    small = module.default_channel_major_tuning(4, 4096, 4096, 32, atomic_cols=False)
    assert (small["fwd_block_d"], small["bwd_block_d"], small["bwd_warps"]) == (16, 4, 1)
    # Four-row dB/dC sums only for small grids (4096 backward programs here; 1024 at 1 x 16384 x 4096).
    assert small["bwd_four_row_sums"] == 0
    assert module.default_channel_major_tuning(1, 16384, 4096, 32, atomic_cols=False)["bwd_four_row_sums"] == 1
    for batch, seq, width in [(8, 4096, 4608), (16, 4096, 4608), (1, 262144, 4608)]:
        atomic = module.default_channel_major_tuning(batch, seq, width, 32)  # the default: no partials
        assert (atomic["bwd_block_d"], atomic["bwd_warps"], atomic["bwd_atomic_cols"]) == (4, 1, 1)
        assert atomic["bwd_four_row_sums"] == 1
        t = module.default_channel_major_tuning(batch, seq, width, 32, atomic_cols=False)
        partials = 2 * batch * (width // t["bwd_block_d"]) * 16 * seq * 4
        narrower = 2 * batch * (width // (t["bwd_block_d"] // 2)) * 16 * seq * 4
        assert partials <= module._PARTIALS_BUDGET or t["bwd_block_d"] == 64
        assert t["bwd_block_d"] == 4 or narrower > module._PARTIALS_BUDGET  # the narrowest that fits
        assert 1 <= t["bwd_warps"] <= 4


def _assert_grads_match_reference(args, grads, rtol=2e-5):
    """Every gradient of the fused scan (float32 inputs) against the reference implementation's."""
    _, grads_ref = values_and_grads(ops.selective_scan, args, dict(delta_softplus=True, implementation="reference"))
    for name in args:
        assert_close(grads[name], grads_ref[name], rtol, name)


# 97 steps: a ragged last 32-step tile; 22 and 12 channels: padded channel blocks of 4.
@pytest.mark.parametrize("seq,width,dtype", [(97, 22, jnp.float32), (64, 12, jnp.bfloat16)])
def test_backward_default_tiles_sum_db_dc_four_states_at_a_time(seq, width, dtype, monkeypatch):
    """The default backward tile (4 channels x 32 steps, one warp) sums dB, dC over channels 4 states
    at a time (`channel_sums`): ragged last tiles and padded channels agree with the state-by-state
    butterfly (and, in float32, with the reference); breaking the four-row sums is caught."""
    module = importlib.import_module("pallas_kernels.selective_scan.selective_scan")
    knobs = module.default_channel_major_tuning(2, seq, width, 32, jnp.dtype(dtype).itemsize)
    assert (knobs["bwd_block_d"], knobs["bwd_warps"], knobs["bwd_four_row_sums"]) == (4, 1, 1)
    args = make_inputs(2, seq, width, 16, seed=5, dtype=dtype)
    options = dict(delta_softplus=True, backend="triton_channel_major")  # default chunk_size 64 -> tiles of 32
    _, four_rows = values_and_grads(fused, args, options)
    _, butterfly = values_and_grads(fused, args, dict(options, tuning=dict(bwd_four_row_sums=0)))
    for name in args:
        assert_close(four_rows[name], butterfly[name], 1e-6 if dtype == jnp.float32 else 1e-2, name)
    if dtype == jnp.float32:
        _assert_grads_match_reference(args, four_rows)
    from pallas_kernels.selective_scan import channel_sums

    monkeypatch.setattr(channel_sums, "quad_sums", lambda p0, p1, channel, interpret: p0)  # half the sum
    jax.clear_caches()
    _, broken = values_and_grads(fused, args, options)
    jax.clear_caches()
    with pytest.raises(AssertionError):
        assert_close(broken["B"], butterfly["B"], 1e-2, "B")


def test_backward_default_tiles_add_four_row_sums_atomically():
    """bwd_atomic_cols on the default tile: the four-row dB, dC sums are added into one accumulator
    shared by all channel blocks (a ragged last tile, padded channels) and match the reference."""
    args = make_inputs(2, 71, 22, 16, seed=7)
    _, grads = values_and_grads(fused, args, dict(delta_softplus=True, backend="triton_channel_major",
                                                  tuning=dict(bwd_atomic_cols=1, bwd_four_row_sums=1)))
    _assert_grads_match_reference(args, grads)


def test_atomic_backward_keeps_four_channel_blocks_whatever_the_partials_budget(monkeypatch):
    """With bwd_atomic_cols (the default) there are no per-block partials, so the partials budget must not
    widen the backward's block (which would also turn the four-row sums off)."""
    module = importlib.import_module("pallas_kernels.selective_scan.selective_scan")
    monkeypatch.setattr(module, "_PARTIALS_BUDGET", 1)  # any partials are over budget
    seen = []
    backward = module.triton_channel_major_kernels.backward
    monkeypatch.setattr(module.triton_channel_major_kernels, "backward",
                        lambda *a, **kw: seen.append(kw) or backward(*a, **kw))
    args = make_inputs(1, 40, 16, 16, seed=8)
    jax.clear_caches()  # trace anew, so the patched backward sees both calls
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    for tuning in (dict(bwd_atomic_cols=0), None):  # partials, then the default (atomic)
        values_and_grads(fused, args, dict(delta_softplus=True, backend="triton_channel_major", tuning=tuning))
    # JAX's switch for run-to-run identical results turns the default back to the partials.
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true")
    jax.clear_caches()
    values_and_grads(fused, args, dict(delta_softplus=True, backend="triton_channel_major"))
    widened, atomic, deterministic = seen
    assert (widened["block_d"], widened["atomic_cols"]) == (16, False)
    assert (atomic["block_d"], atomic["atomic_cols"], atomic["four_row_sums"]) == (4, True, True)
    assert (deterministic["block_d"], deterministic["atomic_cols"]) == (16, False)


@pytest.mark.parametrize("flags,atomic", [("", 1), ("--xla_gpu_deterministic_ops", 0),
                                          ("--xla_gpu_deterministic_ops=TRUE --xla_dump_to=/tmp/x", 0),
                                          ("--xla_gpu_deterministic_ops=false", 1),
                                          ("--xla_gpu_deterministic_ops_extra=true", 1)])
def test_atomic_backward_is_the_default_unless_xla_is_asked_for_deterministic_ops(flags, atomic, monkeypatch):
    module = importlib.import_module("pallas_kernels.selective_scan.selective_scan")
    monkeypatch.setenv("XLA_FLAGS", flags)
    assert module.default_atomic_cols() == atomic
    assert module.default_channel_major_tuning(4, 4096, 4096, 32)["bwd_atomic_cols"] == atomic
