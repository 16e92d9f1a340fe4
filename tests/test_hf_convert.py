"""Hugging Face layouts (samba_jax/hf_convert.py): round trips, and logit parity with transformers'
own Mamba, Llama and Mistral models (needs the `interop` extra: torch and transformers; skipped
without them)."""

import jax
import numpy as np
import pytest

from samba_jax import hf_convert
from samba_jax.config import ConfigError, ModelConfig
from samba_jax.configs.base import load_experiment
from samba_jax.model.samba import SambaLM
from samba_jax.trainer import init_state, make_optimizer


def ours(pattern, tie):
    c = load_experiment("experiments/tiny.py")
    c.model.update(vocab_size=71, d_model=32, num_repeats=2, pattern=pattern, num_heads=4, num_kv_heads=2,
                   head_dim=8, window=5, mlp_hidden=48, compute_dtype="float32", tie_embeddings=tie, norm_eps=1e-6)
    cfg = ModelConfig.from_config(c.model)
    tx, _ = make_optimizer(c.optimizer, 10)
    params = init_state(cfg, tx, jax.random.key(3))["params"]
    return cfg, jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)


@pytest.mark.parametrize("pattern,tie", [("mamba", True), ("attn,mlp", False), ("swa,mlp", True)])
def test_round_trip_is_bit_identical(pattern, tie):
    cfg, params = ours(pattern, tie)
    tensors, config = hf_convert.to_hf(cfg, params)
    cfg2, back = hf_convert.from_hf(config, tensors)
    assert (cfg2.pattern, cfg2.num_repeats, cfg2.tie_embeddings, cfg2.window if "swa" in pattern else 0) == (
        cfg.pattern, cfg.num_repeats, cfg.tie_embeddings, cfg.window if "swa" in pattern else 0)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_samba_has_no_hf_layout():
    cfg, params = ours("mamba,mlp,swa,mlp", True)
    with pytest.raises(ConfigError, match="no Hugging Face layout"):
        hf_convert.to_hf(cfg, params)


@pytest.mark.parametrize("pattern,tie", [("mamba", True), ("attn,mlp", False), ("swa,mlp", False)])
def test_logits_match_transformers(pattern, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg, params = ours(pattern, tie)
    tensors, config = hf_convert.to_hf(cfg, params)
    kind = config.pop("model_type")
    config.pop("architectures")
    if kind == "mamba":
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(**config))
    elif kind == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(**config, attn_implementation="eager"))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, attn_implementation="eager"))
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                                             strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    hf.eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.float().numpy()
    got = SambaLM(cfg).apply({"params": params}, ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
    # And back: their state dict read by us gives the same logits.
    cfg2, params2 = hf_convert.from_hf(dict(config, model_type=kind),
                                       {k: v.float().numpy() for k, v in hf.state_dict().items()})
    np.testing.assert_allclose(SambaLM(cfg2).apply({"params": params2}, ids), want, rtol=2e-4, atol=2e-4)


def test_load_reads_a_transformers_directory(tmp_path):
    import json

    from safetensors.numpy import save_file

    import samba_jax

    cfg, params = ours("swa,mlp", False)
    tensors, config = hf_convert.to_hf(cfg, params)
    save_file({k: np.array(v) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_allclose(samba_jax.load(str(tmp_path))(ids), SambaLM(cfg).apply({"params": params}, ids),
                               rtol=1e-6, atol=1e-6)
