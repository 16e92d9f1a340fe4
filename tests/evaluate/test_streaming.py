"""Streaming per-token NLL (samba_jax/evaluate/streaming.py) against one full-sequence forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax.config import ModelConfig
from samba_jax.evaluate import streaming
from samba_jax.model.samba import SambaLM, init_params

PATTERNS = ["mamba,mlp,swa,mlp", "attn,mlp", "swa,mlp", "mamba"]


def model(pattern):
    cfg = ModelConfig(vocab_size=97, d_model=32, num_repeats=2, pattern=tuple(pattern.split(",")), num_heads=2,
                      num_kv_heads=1, head_dim=16, window=8, mlp_hidden=48, scan_chunk=4)
    return cfg, init_params(cfg, jax.random.key(0))


def full_forward_nll(cfg, params, rows):
    logits = SambaLM(cfg).apply({"params": params}, jnp.asarray(rows[:, :-1]))
    targets = jnp.asarray(rows[:, 1:, None])
    return np.asarray(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets, -1)[..., 0])


@pytest.mark.parametrize("pattern", PATTERNS)
def test_streaming_equals_one_full_forward_across_window_and_chunk_edges(pattern):
    """37 scored tokens, window 8: chunks of 5 divide neither the length nor the window; 1 is token by token."""
    cfg, params = model(pattern)
    rows = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 38))
    want = full_forward_nll(cfg, params, rows)
    for chunk in (5, 1):
        got = streaming.stream_nll(cfg, params, rows, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"{pattern} chunk {chunk}")


def test_a_dropped_state_is_caught():
    """The comparison can fail: scoring each chunk from a fresh state differs past the first chunk."""
    cfg, params = model("mamba,mlp,swa,mlp")
    rows = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 21))
    want = full_forward_nll(cfg, params, rows)
    fresh = np.concatenate([streaming.stream_nll(cfg, params, rows[:, s:s + 11], 16) for s in (0, 10)], axis=1)
    np.testing.assert_allclose(fresh[:, :10], want[:, :10], rtol=1e-5, atol=2e-5)
    assert np.abs(fresh[:, 10:] - want[:, 10:]).max() > 1e-3


def test_the_state_of_samba_is_constant_in_length_and_of_full_attention_linear():
    samba, _ = model("mamba,mlp,swa,mlp")
    llama, _ = model("attn,mlp")
    assert streaming.state_bytes(samba, 1, 1 << 20) == streaming.state_bytes(samba, 1, 1 << 10)
    grow = streaming.state_bytes(llama, 1, 2048) - streaming.state_bytes(llama, 1, 1024)
    assert grow == 1024 * 2 * 2 * llama.num_kv_heads * llama.head_dim * 4 + 1024 * 2 * 4  # k, v, positions
