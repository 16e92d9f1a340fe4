"""Chunked head + cross-entropy equals the plain full-logits loss, values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from samba_jax.config import ConfigError, ModelConfig, validate_run
from samba_jax.configs.base import load_experiment
from samba_jax.model.chunked_loss import auto_chunks, chunked_cross_entropy
from samba_jax.model.samba import SambaLM, init_params
from samba_jax.trainer import next_token_loss

CFG = ModelConfig(vocab_size=50, d_model=16, num_repeats=1, num_heads=2, num_kv_heads=1, head_dim=8,
                  window=4, mlp_hidden=24, ssm_state=4, scan_chunk=4)


def plain_loss(hidden, head, targets):
    """The obvious version: every logit at once, float32."""
    return optax.softmax_cross_entropy_with_integer_labels(hidden @ head, targets).sum()


@pytest.mark.parametrize("chunks", [1, 2, 3, 12])
def test_chunked_cross_entropy_matches_full_logits_values_and_gradients(chunks):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k1, (2, 12, 16))
    head = jax.random.normal(k2, (16, 50)) * 0.3
    targets = jax.random.randint(k3, (2, 12), 0, 50)
    want, want_grads = jax.value_and_grad(plain_loss, argnums=(0, 1))(hidden, head, targets)
    got, got_grads = jax.value_and_grad(lambda h, w: chunked_cross_entropy(h, w, targets, chunks),
                                        argnums=(0, 1))(hidden, head)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # The gradient check can fail: one changed target changes the hidden-state gradient there.
    moved = targets.at[1, 5].set((targets[1, 5] + 1) % 50)
    other = jax.grad(lambda h: chunked_cross_entropy(h, head, moved, chunks))(hidden)
    assert float(jnp.abs(other - want_grads[0])[1, 5].max()) > 1e-3


def test_bfloat16_head_matmul_stays_close():
    hidden = jax.random.normal(jax.random.key(1), (1, 8, 16))
    head = jax.random.normal(jax.random.key(2), (16, 50)) * 0.3
    targets = jnp.arange(8)[None] % 50
    want = plain_loss(hidden, head, targets)
    got = chunked_cross_entropy(hidden, head, targets, 4, jnp.bfloat16)
    np.testing.assert_allclose(got, want, rtol=2e-2)


def test_chunks_must_divide_the_sequence():
    with pytest.raises(ValueError, match="chunks=5 must divide the sequence length 12"):
        chunked_cross_entropy(jnp.zeros((1, 12, 4)), jnp.zeros((4, 3)), jnp.zeros((1, 12), jnp.int32), 5)


def test_auto_chunks_only_splits_large_logits_into_divisors():
    assert auto_chunks(8, 4096, 32000) == 1  # 4.19 GB < 4 GiB of logits: training shapes stay unchunked
    assert auto_chunks(1, 131072, 32000) == 4  # 16.8 GB -> four quarters of 4.2 GB
    chunks = auto_chunks(1, 393216, 32000)  # 50.3 GB -> 12 chunks (the first divisor >= 11.7)
    assert chunks == 12 and 393216 // chunks * 32000 * 4 <= 4 * 2**30
    assert auto_chunks(1, 7, 10**12) == 7  # cannot go below one position per chunk


@pytest.mark.parametrize("tie", [True, False])
def test_next_token_loss_is_the_same_chunked_or_not(tie):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    params = jax.tree.map(lambda x: x, init_params(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    tokens = jax.random.randint(jax.random.key(3), (2, 13), 0, 50)

    def loss(c):
        return jax.value_and_grad(lambda p: next_token_loss(SambaLM(c), p, tokens)[0])(params)

    (want, want_g), (got, got_g) = loss(dataclasses.replace(cfg, loss_chunks=1)), \
        loss(dataclasses.replace(cfg, loss_chunks=4))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_g, want_g)


def test_a_loss_chunk_count_that_does_not_divide_the_sequence_is_a_config_error():
    c = load_experiment("experiments/tiny.py")
    c.model.loss_chunks = 3  # tiny's seq_len is 128
    with pytest.raises(ConfigError, match="model.loss_chunks.*does not divide data.seq_len=128"):
        validate_run(c, ModelConfig.from_config(c.model))
