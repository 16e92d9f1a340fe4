"""RMSNorm, rotary embeddings, SwiGLU and the initialisers against independent numpy versions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax.model.layers import Dense, RMSNorm, SwiGLU, apply_rotary, torch_linear_init


def test_rmsnorm_matches_formula_with_eps_1e5():
    x = np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32) * 3
    norm = RMSNorm(1e-5)
    params = norm.init(jax.random.key(0), x)
    scale = np.random.default_rng(1).normal(size=16).astype(np.float32)
    params = jax.tree.map(lambda _: scale, params)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * scale
    np.testing.assert_allclose(norm.apply(params, x), expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_computes_in_float32_from_bfloat16():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.bfloat16)
    norm = RMSNorm()
    out = norm.apply(norm.init(jax.random.key(0), x), x)
    assert out.dtype == jnp.float32


def _naive_neox_rotary(x, positions, base):
    """Rotate pairs (i, i + d/2) by angle pos * base^(-2i/d), one element at a time."""
    out = np.array(x, dtype=np.float64)
    b, t, h, d = x.shape
    for bi in range(b):
        for ti in range(t):
            for i in range(d // 2):
                theta = positions[bi, ti] * base ** (-2.0 * i / d)
                c, s = np.cos(theta), np.sin(theta)
                x1, x2 = x[bi, ti, :, i], x[bi, ti, :, i + d // 2]
                out[bi, ti, :, i] = x1 * c - x2 * s
                out[bi, ti, :, i + d // 2] = x2 * c + x1 * s
    return out


def test_rotary_is_neox_half_split_at_absolute_positions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
    positions = np.stack([np.arange(7), np.arange(100, 107)]).astype(np.int32)
    np.testing.assert_allclose(apply_rotary(jnp.asarray(x), jnp.asarray(positions), 10000.0),
                               _naive_neox_rotary(x, positions, 10000.0), rtol=1e-4, atol=1e-4)


def test_rotary_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)

    def score(pq, pk):
        rq = apply_rotary(jnp.asarray(q), jnp.full((1, 1), pq), 10000.0)
        rk = apply_rotary(jnp.asarray(k), jnp.full((1, 1), pk), 10000.0)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(1005, 1002), rel=1e-3)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_swiglu_is_w3_of_silu_w1_times_w2():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    mlp = SwiGLU(hidden=12)
    params = mlp.init(jax.random.key(0), x)["params"]
    w1, w2, w3 = (np.asarray(params[n]["kernel"].unbox()) for n in ("w1", "w2", "w3"))
    g = x @ w1
    expected = ((g / (1 + np.exp(-g))) * (x @ w2)) @ w3
    np.testing.assert_allclose(mlp.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)


def test_torch_linear_init_is_uniform_one_over_sqrt_fan_in():
    fan_in, fan_out = 256, 512
    w = np.asarray(torch_linear_init()(jax.random.key(0), (fan_in, fan_out)))
    bound = 1 / np.sqrt(fan_in)
    assert np.abs(w).max() <= bound
    assert np.abs(w).max() > 0.99 * bound
    np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.02)


def test_dense_computes_in_its_dtype_with_float32_params():
    x = jnp.ones((2, 4), jnp.float32)
    layer = Dense(3, ("embed", "mlp"), jnp.bfloat16)
    params = layer.init(jax.random.key(0), x)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert layer.apply(params, x).dtype == jnp.bfloat16
