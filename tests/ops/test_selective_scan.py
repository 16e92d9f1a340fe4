"""Tests for samba_jax.ops.selective_scan: every implementation against the sequential oracle."""

import functools
import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax.ops import selective_scan, selective_scan_step

FAST_IMPLEMENTATIONS = ("chunked", "associative")
# Compiled once per configuration: eager dispatch of the scans' many small ops is slow on CPU.
jit_selective_scan = jax.jit(selective_scan, static_argnames=(
    "delta_softplus", "return_final_state", "implementation", "chunk_size"))
POOL_SIZE = 1 << 15


@functools.cache
def _normal_pool(seed):
    """A fixed-size draw from jax.random, so every test reuses one compiled sampler."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (POOL_SIZE,)), np.float64)


def random_normals(seed, *shapes):
    """Independent N(0, 1) arrays of the given shapes (float64 numpy), reproducible per seed."""
    pool, offset, arrays = _normal_pool(seed), 0, []
    for shape in shapes:
        size = math.prod(shape)
        arrays.append(pool[offset:offset + size].reshape(shape))
        offset += size
    assert offset <= POOL_SIZE
    return arrays


def make_inputs(seed, batch=2, seq=37, d_inner=6, d_state=4, dtype=jnp.float32):
    """Mamba-like random inputs: dt bias from Mamba's init, A = -exp(A_log) with A_log = log(1..d_state)."""
    u, delta, B, C, D, z, dt_normal, state = random_normals(
        seed, (batch, seq, d_inner), (batch, seq, d_inner), (batch, seq, d_state), (batch, seq, d_state),
        (d_inner,), (batch, seq, d_inner), (d_inner,), (batch, d_inner, d_state))
    # dt log-uniform in [1e-3, 1e-1] (uniform from the normal's CDF), then delta_bias = softplus^-1(dt).
    dt_uniform = 0.5 * (1 + np.vectorize(math.erf)(dt_normal / math.sqrt(2)))
    dt = np.exp(math.log(1e-3) + dt_uniform * (math.log(1e-1) - math.log(1e-3)))
    a_log = np.log(np.tile(np.arange(1, d_state + 1, dtype=np.float64), (d_inner, 1)))
    inputs = {"u": u, "delta": delta, "A": -np.exp(a_log), "B": B, "C": C, "D": D, "z": z,
              "delta_bias": dt + np.log(-np.expm1(-dt)), "initial_state": state}
    return {name: jnp.asarray(value, dtype) for name, value in inputs.items()}


def assert_close(actual, expected, rtol=1e-5, atol_scale=1e-5, err_msg=""):
    """Relative tolerance plus an absolute floor proportional to the expected array's magnitude."""
    expected = np.asarray(expected, np.float64)
    atol = atol_scale * max(np.max(np.abs(expected)), 1e-6)
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, err_msg=err_msg)


def test_reference_matches_numpy_loop():
    """The oracle itself against a plain float64 loop over mamba_ssm's formula."""
    inputs = make_inputs(0, batch=1, seq=5, d_inner=3, d_state=2)
    y, final_state = jit_selective_scan(**inputs, delta_softplus=True, return_final_state=True,
                                    implementation="reference")
    x = {name: np.asarray(value, np.float64) for name, value in inputs.items()}
    delta = np.log1p(np.exp(x["delta"] + x["delta_bias"]))
    state = x["initial_state"].copy()
    expected = np.zeros_like(x["u"])
    for t in range(5):
        for d in range(3):
            for n in range(2):
                state[0, d, n] = (np.exp(delta[0, t, d] * x["A"][d, n]) * state[0, d, n]
                                  + delta[0, t, d] * x["B"][0, t, n] * x["u"][0, t, d])
            y_t = np.dot(state[0, d], x["C"][0, t]) + x["D"][d] * x["u"][0, t, d]
            expected[0, t, d] = y_t * x["z"][0, t, d] / (1 + np.exp(-x["z"][0, t, d]))
    assert_close(y, expected)
    assert_close(final_state, state)


# (batch, seq, d_inner, d_state, chunk, optional arguments, softplus, return_final_state)
ALL_OPTIONAL = ("D", "z", "delta_bias", "initial_state")
EQUIVALENCE_CASES = [
    (2, 37, 6, 4, 8, ALL_OPTIONAL, True, True),
    (2, 37, 6, 4, 8, (), False, False),
    (2, 29, 6, 4, 8, ("D", "z", "delta_bias"), True, True),
    (1, 1, 5, 3, 8, ALL_OPTIONAL, True, True),
    (2, 16, 4, 4, 16, ("initial_state",), False, True),
    (1, 20, 4, 2, 64, ("delta_bias", "z"), False, False),
]


@pytest.mark.parametrize("batch,seq,d_inner,d_state,chunk,optional,softplus,return_final", EQUIVALENCE_CASES)
def test_matches_reference_values_and_gradients(batch, seq, d_inner, d_state, chunk, optional, softplus,
                                                return_final):
    inputs = make_inputs(seq * 10 + chunk, batch, seq, d_inner, d_state)
    if not softplus:  # without softplus, delta and delta_bias must already be positive step sizes
        inputs["delta"] = 0.5 * jax.nn.softplus(inputs["delta"])
        inputs["delta_bias"] = jax.nn.softplus(inputs["delta_bias"])
    args = {name: inputs[name] for name in ("u", "delta", "A", "B", "C") + tuple(optional)}
    y_cotangent, state_cotangent = map(jnp.asarray, random_normals(
        1000 + seq, (batch, seq, d_inner), (batch, d_inner, d_state)))

    def loss(args, implementation):
        out = selective_scan(**args, delta_softplus=softplus, return_final_state=return_final,
                             implementation=implementation, chunk_size=chunk)
        if not return_final:
            return jnp.sum(out * y_cotangent), out
        y, final_state = out
        return jnp.sum(y * y_cotangent) + jnp.sum(final_state * state_cotangent), out

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, expected_out), expected_grads = grad_fn(args, "reference")
    for implementation in FAST_IMPLEMENTATIONS:
        (_, out), grads = grad_fn(args, implementation)
        for actual, expected in zip(jax.tree.leaves(out), jax.tree.leaves(expected_out)):
            assert actual.shape == expected.shape and actual.dtype == jnp.float32
            assert_close(actual, expected, err_msg=f"{implementation} output")
        assert set(grads) == set(args)
        for name in args:
            assert_close(grads[name], expected_grads[name], rtol=1e-4, atol_scale=1e-5,
                         err_msg=f"{implementation}: d loss / d {name}")


# (seq, splits, optional): lengths that divide evenly and lengths that leave a remainder.
SPLIT_CASES = [
    (40, 4, ("D", "z", "delta_bias", "initial_state")),
    (37, 3, ("D", "z", "delta_bias")),  # 3 pieces of 12 and one step after them
    (29, 8, ("z", "initial_state")),  # 8 pieces of 3 and 5 steps after them
]


@pytest.mark.parametrize("implementation", ["chunked", "pallas"])
@pytest.mark.parametrize("seq,splits,optional", SPLIT_CASES)
def test_sequence_splits_match_reference_values_and_gradients(implementation, seq, splits, optional):
    """Scanning pieces side by side and joining them is exact: outputs, final state, every gradient."""
    inputs = make_inputs(50 + seq, batch=2, seq=seq, d_inner=5, d_state=4)
    args = {name: inputs[name] for name in ("u", "delta", "A", "B", "C") + optional}
    y_cotangent, state_cotangent = map(jnp.asarray, random_normals(60 + seq, (2, seq, 5), (2, 5, 4)))

    def loss(args, implementation, splits):
        y, final = selective_scan(**args, delta_softplus=True, return_final_state=True,
                                  implementation=implementation, chunk_size=4, sequence_splits=splits)
        return jnp.sum(y * y_cotangent) + jnp.sum(final * state_cotangent), (y, final)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=(1, 2))
    (_, expected_out), expected_grads = grad_fn(args, "reference", 1)
    (_, out), grads = grad_fn(args, implementation, splits)
    for actual, expected, what in zip(out, expected_out, ("y", "final state")):
        assert actual.shape == expected.shape
        assert_close(actual, expected, err_msg=what)
    for name in args:
        assert_close(grads[name], expected_grads[name], rtol=1e-4, atol_scale=1e-5, err_msg=f"d loss / d {name}")


def test_default_sequence_splits_only_split_the_gpu_kernel_at_small_batch(monkeypatch):
    module = importlib.import_module("samba_jax.ops.selective_scan")  # the module, not the op it exports
    assert module.default_sequence_splits("chunked", 1, 1 << 17, 4096) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert module.default_sequence_splits("chunked", 1, 1 << 17, 4096) == 1
    assert module.default_sequence_splits("pallas", 1, 1 << 17, 4096) == 1  # training: unsplit is faster
    assert module.default_sequence_splits("pallas:triton_channel_major", 1, 1 << 17, 4096) == 1
    long_prompt = module.default_sequence_splits("pallas:triton", 1, 1 << 17, 4096)
    assert long_prompt > 1 and (1 << 17) // long_prompt >= module._SPLIT_MIN_STEPS
    assert 4096 * long_prompt >= module._SPLIT_TARGET_ROWS or (1 << 17) // long_prompt < 2 * module._SPLIT_MIN_STEPS
    assert module.default_sequence_splits("pallas:triton", 1, module._SPLIT_MIN_STEPS, 4096) == 1  # too short
    assert module.default_sequence_splits("pallas:triton", 4, 4096, 4096) == 1  # enough rows already


def test_bad_sequence_splits_raise_value_error_naming_them():
    inputs = make_inputs(9, seq=8)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="`sequence_splits`"):
            selective_scan(**inputs, sequence_splits=bad)


@pytest.mark.parametrize("implementation", FAST_IMPLEMENTATIONS)
def test_bfloat16_inputs(implementation):
    inputs = make_inputs(1, seq=21, dtype=jnp.bfloat16)
    y, final_state = jit_selective_scan(**inputs, delta_softplus=True, return_final_state=True,
                                    implementation=implementation, chunk_size=8)
    upcast = {name: value.astype(jnp.float32) for name, value in inputs.items()}
    expected_y, expected_state = jit_selective_scan(**upcast, delta_softplus=True, return_final_state=True,
                                                implementation="reference")
    assert y.dtype == jnp.bfloat16 and final_state.dtype == jnp.float32
    assert_close(y, expected_y, rtol=2e-2, atol_scale=1e-2)
    assert_close(final_state, expected_state, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("split", [24, 19])
def test_chunked_state_passing_equals_whole_sequence(split):
    inputs = make_inputs(2, seq=40)
    common = {"A": inputs["A"], "D": inputs["D"], "delta_bias": inputs["delta_bias"],
              "delta_softplus": True, "return_final_state": True, "implementation": "chunked",
              "chunk_size": 8}
    per_step = {name: inputs[name] for name in ("u", "delta", "B", "C", "z")}
    first = {name: value[:, :split] for name, value in per_step.items()}
    second = {name: value[:, split:] for name, value in per_step.items()}

    whole_y, whole_state = jit_selective_scan(**per_step, initial_state=inputs["initial_state"], **common)
    first_y, first_state = jit_selective_scan(**first, initial_state=inputs["initial_state"], **common)
    second_y, second_state = jit_selective_scan(**second, initial_state=first_state, **common)
    assert_close(jnp.concatenate([first_y, second_y], axis=1), whole_y)
    assert_close(second_state, whole_state)


def test_step_iterated_equals_reference():
    inputs = make_inputs(3, seq=9)
    expected_y, expected_state = jit_selective_scan(**inputs, delta_softplus=True, return_final_state=True,
                                                implementation="reference")
    step = jax.jit(lambda state, t: selective_scan_step(
        state, inputs["u"][:, t], inputs["delta"][:, t], inputs["A"], inputs["B"][:, t], inputs["C"][:, t],
        D=inputs["D"], z=inputs["z"][:, t], delta_bias=inputs["delta_bias"], delta_softplus=True))
    state, outputs = inputs["initial_state"], []
    for t in range(9):
        y_t, state = step(state, t)
        outputs.append(y_t)
    assert_close(jnp.stack(outputs, axis=1), expected_y)
    assert_close(state, expected_state)
    assert state.dtype == jnp.float32


@pytest.mark.parametrize("implementation", ("chunked", "associative", "reference"))
def test_causality(implementation):
    inputs = make_inputs(4, seq=24)
    changed_step = 13
    perturbed = dict(inputs, u=inputs["u"].at[:, changed_step].add(1.0))
    def run(args):
        return jit_selective_scan(**args, delta_softplus=True, implementation=implementation, chunk_size=8)
    y, y_perturbed = run(inputs), run(perturbed)
    np.testing.assert_array_equal(y[:, :changed_step], y_perturbed[:, :changed_step])
    assert np.all(np.any(np.asarray(y[:, changed_step:] != y_perturbed[:, changed_step:]), axis=(0, 2)))


def _all_var_shapes(jaxpr):
    """Shapes of every variable in a jaxpr, recursing into sub-jaxprs (scan, checkpoint, pjit, cond...)."""
    shapes = [v.aval.shape for v in list(jaxpr.invars) + list(jaxpr.outvars) if hasattr(v, "aval")]
    for eqn in jaxpr.eqns:
        shapes += [v.aval.shape for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns"):
                    shapes += _all_var_shapes(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    shapes += _all_var_shapes(sub.jaxpr)
    return shapes


def _intermediate_shapes(implementation):
    """(shapes of the forward jaxpr, shapes of the gradient jaxpr) for batch 2, seq 256, d_inner 8, d_state 4."""
    inputs = make_inputs(5, batch=2, seq=256, d_inner=8, d_state=4)

    def loss(args):
        y, final_state = selective_scan(**args, delta_softplus=True, return_final_state=True,
                                        implementation=implementation, chunk_size=16)
        return jnp.sum(y) + jnp.sum(final_state)

    forward = jax.make_jaxpr(loss)(inputs)
    backward = jax.make_jaxpr(jax.grad(loss))(inputs)
    return _all_var_shapes(forward.jaxpr), _all_var_shapes(backward.jaxpr)


def test_chunked_never_materializes_full_state_sequence():
    full_shape, full_size = (2, 256, 8, 4), 2 * 256 * 8 * 4
    for shapes in _intermediate_shapes("chunked"):
        assert (2, 16, 8, 4) in shapes  # the walk did reach inside the chunk body
        assert full_shape not in shapes
        assert max(math.prod(shape) for shape in shapes) < full_size
    # The check can fail: the whole-sequence baseline does hold such arrays.
    assert all(full_shape in shapes for shapes in _intermediate_shapes("associative"))


def test_default_implementation_matches_reference():
    inputs = make_inputs(6, seq=11)
    assert_close(jit_selective_scan(**inputs, delta_softplus=True),
                 jit_selective_scan(**inputs, delta_softplus=True, implementation="reference"))


BAD_ARGUMENTS = [
    ("implementation", lambda x: {"implementation": "cuda"}),
    ("implementation", lambda x: {"implementation": "fast"}),
    ("chunk_size", lambda x: {"chunk_size": 0}),
    ("chunk_size", lambda x: {"chunk_size": 2.5}),
    ("u", lambda x: {"u": x["u"][0]}),
    ("delta", lambda x: {"delta": x["delta"][:, :-1]}),
    ("A", lambda x: {"A": x["A"][:, 0]}),
    ("A", lambda x: {"A": x["A"][:-1]}),
    ("B", lambda x: {"B": x["B"][:, :, :-1]}),
    ("C", lambda x: {"C": x["C"][:1]}),
    ("D", lambda x: {"D": x["D"][:-1]}),
    ("z", lambda x: {"z": x["z"][..., :-1]}),
    ("delta_bias", lambda x: {"delta_bias": x["delta_bias"][None]}),
    ("initial_state", lambda x: {"initial_state": x["initial_state"][:, :, :-1]}),
]


@pytest.mark.parametrize("argument,override", BAD_ARGUMENTS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise_value_error_naming_them(argument, override):
    inputs = make_inputs(7, seq=5)
    with pytest.raises(ValueError, match=f"`{argument}`"):
        selective_scan(**{**inputs, **override(inputs)})


@pytest.mark.parametrize("argument,override", [
    ("state", lambda x: {"state": x["state"][:, :-1]}),
    ("u", lambda x: {"u": x["u"][None]}),
    ("B", lambda x: {"B": x["B"][:, :-1]}),
    ("z", lambda x: {"z": x["z"][:1]}),
])
def test_step_bad_arguments_raise_value_error_naming_them(argument, override):
    inputs = make_inputs(8, seq=1)
    step_inputs = {"state": inputs["initial_state"], "u": inputs["u"][:, 0],
                   "delta": inputs["delta"][:, 0], "A": inputs["A"], "B": inputs["B"][:, 0],
                   "C": inputs["C"][:, 0], "z": inputs["z"][:, 0]}
    with pytest.raises(ValueError, match=f"`{argument}`"):
        selective_scan_step(**{**step_inputs, **override(step_inputs)})


def test_unknown_implementation_lists_valid_names():
    inputs = make_inputs(9, seq=3)
    with pytest.raises(ValueError, match="associative.*chunked.*pallas.*reference"):
        selective_scan(**inputs, implementation="cuda")


@pytest.mark.parametrize("implementation,splits", [("chunked", 1), ("pallas", 1), ("pallas", 3)])
def test_channels_first_layout_equals_channels_last(implementation, splits):
    """mamba_ssm's (batch, d_inner, seq) layout: same outputs and gradients, transposed."""
    inputs = make_inputs(11, batch=2, seq=19, d_inner=5, d_state=4)
    per_step = ("u", "delta", "z", "B", "C")
    swap = lambda args: {k: jnp.swapaxes(v, 1, 2) if k in per_step else v for k, v in args.items()}  # noqa: E731

    def loss(args, layout):
        y, final = selective_scan(**args, delta_softplus=True, return_final_state=True, layout=layout,
                                  implementation=implementation, chunk_size=8, sequence_splits=splits)
        if layout == "channels_first":
            y = jnp.swapaxes(y, 1, 2)
        return jnp.sum(jnp.sin(y)) + jnp.sum(final ** 2)

    want, want_grads = jax.value_and_grad(loss)(inputs, "channels_last")
    got, got_grads = jax.value_and_grad(loss)(swap(inputs), "channels_first")
    assert_close(got, want)
    got_grads = swap(got_grads)
    for name in inputs:
        assert_close(got_grads[name], want_grads[name], err_msg=name)
    with pytest.raises(ValueError, match="`delta` must have shape \\(batch, d_inner, seq\\)"):
        selective_scan(**dict(swap(inputs), delta=inputs["delta"]), layout="channels_first")
    with pytest.raises(ValueError, match="`layout`"):
        selective_scan(**inputs, layout="NCW")
