"""The Samba LM: parameter counts of the reference configs, init statistics, causality, patterns."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax.config import ModelConfig, parameter_count
from samba_jax.configs import base
from samba_jax.model.attention import Attention
from samba_jax.model.layers import apply_rotary
from samba_jax.model.samba import SambaLM, abstract_params, init_params

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")
TINY = ModelConfig(vocab_size=97, d_model=32, num_repeats=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   window=5, mlp_hidden=48, ssm_state=4, scan_chunk=4)


def load_experiment(name, arg=None):
    return base.load_experiment(os.path.join(EXPERIMENTS, f"{name}.py") + (f":{arg}" if arg else ""))


def count_initialised(cfg):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(abstract_params(cfg))))


# Published counts of microsoft/Samba's configs (samba_reference.md, computed from lit_gpt/config.py).
@pytest.mark.parametrize("name,millions", [
    ("samba_421m", 421.8), ("samba_1b", 1330.2), ("llama_1b", 1347.8), ("swa_1b", 1347.8),
    ("mamba_1b", 1334.7), ("mamba_swa_mlp_1b", 1239.4)])
def test_reference_parameter_counts(name, millions):
    cfg = ModelConfig.from_config(load_experiment(name).model)
    n = count_initialised(cfg)
    assert abs(n / 1e6 - millions) / millions < 1e-3, n
    assert n == parameter_count(cfg)["total"]


def test_inference_baseline_is_within_3_percent_of_samba_1b():
    llama3 = count_initialised(ModelConfig.from_config(load_experiment("llama3_1b").model))
    samba = count_initialised(ModelConfig.from_config(load_experiment("samba_1b").model))
    assert llama3 == 1_342_789_632 and abs(llama3 / samba - 1) < 0.03


def test_samba_421m_mamba_block_matches_reference_table():
    # samba_reference.md §1.4: one Mamba mixer of the 421M model has 14,914,560 parameters.
    cfg = ModelConfig.from_config(load_experiment("samba_421m").model)
    mamba = nn.unbox(abstract_params(cfg))["blocks"]["mamba_0"]
    assert sum(math.prod(x.shape[1:]) for x in jax.tree.leaves(mamba)) == 14_914_560


def test_init_statistics_follow_the_reference():
    cfg = ModelConfig(vocab_size=2048, d_model=256, num_repeats=3, num_heads=4, num_kv_heads=4, head_dim=64,
                      window=8, mlp_hidden=512)
    p = nn.unbox(init_params(cfg, jax.random.key(0)))
    blocks = p["blocks"]
    np.testing.assert_allclose(np.std(p["embed"]["embedding"]), 0.02, rtol=0.02)
    assert abs(float(np.mean(p["embed"]["embedding"]))) < 1e-3

    def check_uniform(w, bound):
        w = np.asarray(w)
        assert np.abs(w).max() <= bound * (1 + 1e-6)
        np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.05)

    d, di = cfg.d_model, cfg.d_inner
    out_div = math.sqrt(2 * 2 * cfg.num_repeats)  # sqrt(2 * n_blocks): 2 blocks per repeat
    check_uniform(blocks["mamba_0"]["in_proj"]["kernel"], 1 / math.sqrt(d))
    check_uniform(blocks["mamba_0"]["x_proj"]["kernel"], 1 / math.sqrt(di))
    check_uniform(blocks["mamba_0"]["dt_proj"]["kernel"], 1 / math.sqrt(cfg.resolved_dt_rank))
    check_uniform(blocks["mamba_0"]["conv_kernel"], 0.5)
    check_uniform(blocks["mamba_0"]["conv_bias"], 0.5)
    check_uniform(blocks["swa_2"]["q_proj"]["kernel"], 1 / math.sqrt(d))
    check_uniform(blocks["mlp_1"]["w1"]["kernel"], 1 / math.sqrt(d))
    # The three residual output projections are divided by sqrt(2 * n_blocks).
    check_uniform(blocks["mamba_0"]["out_proj"]["kernel"], 1 / math.sqrt(di) / out_div)
    check_uniform(blocks["swa_2"]["o_proj"]["kernel"], 1 / math.sqrt(d) / out_div)
    check_uniform(blocks["mlp_3"]["w3"]["kernel"], 1 / math.sqrt(cfg.mlp_hidden) / out_div)
    # dt = softplus(bias) is log-uniform in [1e-3, 1e-1].
    dt = np.log1p(np.exp(np.asarray(blocks["mamba_0"]["dt_bias"], np.float64)))
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    np.testing.assert_allclose(np.log(dt).mean(), (math.log(1e-3) + math.log(1e-1)) / 2, atol=0.05)
    np.testing.assert_allclose(blocks["mamba_0"]["A_log"][0, 7], np.log(np.arange(1, 17)), rtol=1e-6)
    np.testing.assert_array_equal(blocks["mamba_0"]["D"], 1.0)
    np.testing.assert_array_equal(blocks["norm_0"]["scale"], 1.0)
    # Repeats get independent draws.
    assert not np.allclose(blocks["mlp_1"]["w1"]["kernel"][0], blocks["mlp_1"]["w1"]["kernel"][1])


@pytest.mark.parametrize("pattern", ["mamba,mlp,swa,mlp", "attn,mlp", "swa,mlp", "mamba", "mamba,swa,mlp"])
def test_model_is_causal_for_every_pattern(pattern):
    cfg = ModelConfig.from_config({**TINY.__dict__, "pattern": pattern})
    tokens = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    model = SambaLM(cfg)
    params = model.init(jax.random.key(0), tokens)
    logits = model.apply(params, tokens)
    assert logits.shape == (2, 13, cfg.vocab_size) and logits.dtype == jnp.float32
    changed = tokens.at[:, 8].set((tokens[:, 8] + 1) % cfg.vocab_size)
    logits2 = model.apply(params, changed)
    np.testing.assert_array_equal(logits[:, :8], logits2[:, :8])
    assert np.abs(logits[:, 8:] - logits2[:, 8:]).max() > 1e-6


def test_samba_starts_with_mamba_and_alternates():
    p = nn.unbox(abstract_params(TINY))["blocks"]
    assert sorted(p) == ["mamba_0", "mlp_1", "mlp_3", "norm_0", "norm_1", "norm_2", "norm_3", "swa_2"]
    assert p["mamba_0"]["in_proj"]["kernel"].shape[0] == TINY.num_repeats  # stacked for the scan


def test_compiled_program_does_not_grow_with_depth():
    def num_eqns(repeats):
        cfg = ModelConfig.from_config({**TINY.__dict__, "num_repeats": repeats})
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = abstract_params(cfg)
        return len(jax.make_jaxpr(lambda p: SambaLM(cfg).apply({"params": p}, tokens))(params).eqns)

    assert num_eqns(2) == num_eqns(12)


def test_attention_module_matches_dense_gqa_computation():
    x = np.random.default_rng(0).normal(size=(2, 9, TINY.d_model)).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    module = Attention(TINY, window=4)
    params = nn.unbox(module.init(jax.random.key(0), x, positions)["params"])
    out = module.apply({"params": params}, x, positions)

    h, kv, hd = TINY.num_heads, TINY.num_kv_heads, TINY.head_dim
    q = apply_rotary((x @ params["q_proj"]["kernel"]).reshape(2, 9, h, hd), positions)
    k = apply_rotary((x @ params["k_proj"]["kernel"]).reshape(2, 9, kv, hd), positions)
    v = (x @ params["v_proj"]["kernel"]).reshape(2, 9, kv, hd)
    k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)  # head i uses kv head i // group
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    i, j = np.arange(9)[:, None], np.arange(9)[None]
    scores = np.where((j <= i) & (j > i - 4), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 9, h * hd)
    np.testing.assert_allclose(out, o @ params["o_proj"]["kernel"], rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = ModelConfig.from_config({**TINY.__dict__, "compute_dtype": "bfloat16"})
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = SambaLM(cfg).init(jax.random.key(0), tokens)
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.float32)}
    assert SambaLM(cfg).apply(params, tokens).dtype == jnp.float32
