"""The Mamba mixer against a step-by-step numpy transcription of mamba_ssm's reference forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samba_jax.config import ModelConfig
from samba_jax.model.mamba import MambaMixer, causal_depthwise_conv

CFG = ModelConfig(vocab_size=32, d_model=16, num_repeats=1, pattern=("mamba",), ssm_state=4, dt_rank=3)


def _softplus(x):
    return np.log1p(np.exp(x))


def _silu(x):
    return x / (1 + np.exp(-x))


def _numpy_mamba(p, x):
    """mamba_ssm's Mamba.forward without fused kernels, one channel/time step at a time (float64)."""
    di, n, r = CFG.d_inner, CFG.ssm_state, CFG.resolved_dt_rank
    xz = x @ p["in_proj"]["kernel"]
    xs, z = xz[..., :di], xz[..., di:]
    b, t, _ = x.shape
    conv = np.zeros_like(xs)
    w = p["conv_kernel"]  # (width, di): PyTorch weight[c, 0, k] == w[k, c]
    for ti in range(t):
        for k in range(CFG.ssm_conv):
            src = ti - (CFG.ssm_conv - 1) + k
            if src >= 0:
                conv[:, ti] += xs[:, src] * w[k]
    u = _silu(conv + p["conv_bias"])
    x_dbl = u @ p["x_proj"]["kernel"]
    dt, B, C = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    delta = _softplus(dt @ p["dt_proj"]["kernel"] + p["dt_bias"])
    A = -np.exp(p["A_log"])
    y = np.zeros_like(u)
    for bi in range(b):
        h = np.zeros((di, n))
        for ti in range(t):
            h = np.exp(delta[bi, ti][:, None] * A) * h + (delta[bi, ti] * u[bi, ti])[:, None] * B[bi, ti][None]
            y[bi, ti] = h @ C[bi, ti] + p["D"] * u[bi, ti]
    y = y * _silu(z)
    return y @ p["out_proj"]["kernel"]


def test_mixer_matches_numpy_transcription_of_mamba_ssm():
    x = np.random.default_rng(0).normal(size=(2, 11, CFG.d_model)).astype(np.float32)
    mixer = MambaMixer(CFG, out_scale=0.5)
    params = nn.unbox(mixer.init(jax.random.key(0), x)["params"])
    for impl in ("reference", "chunked"):
        cfg = ModelConfig(**{**CFG.__dict__, "scan_implementation": impl, "scan_chunk": 4})
        out = MambaMixer(cfg, out_scale=0.5).apply({"params": params}, x)
        expected = _numpy_mamba(jax.tree.map(lambda a: np.asarray(a, np.float64), params), x.astype(np.float64))
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)


def test_causal_conv_matches_lax_conv_with_left_padding():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 5)).astype(np.float32)
    kernel = rng.normal(size=(4, 5)).astype(np.float32)
    bias = rng.normal(size=5).astype(np.float32)
    expected = jax.lax.conv_general_dilated(
        jnp.asarray(x), jnp.asarray(kernel)[:, None, :], window_strides=(1,), padding=[(3, 0)],
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=5) + bias
    np.testing.assert_allclose(causal_depthwise_conv(x, kernel, bias), expected, rtol=1e-5, atol=1e-5)


def test_mixer_is_causal():
    x = np.random.default_rng(0).normal(size=(1, 12, CFG.d_model)).astype(np.float32)
    mixer = MambaMixer(CFG)
    params = mixer.init(jax.random.key(0), x)
    x2 = x.copy()
    x2[0, 7] += 1.0
    a, b = mixer.apply(params, x), mixer.apply(params, x2)
    np.testing.assert_array_equal(a[0, :7], b[0, :7])
    assert np.abs(a[0, 7:] - b[0, 7:]).max() > 1e-4
