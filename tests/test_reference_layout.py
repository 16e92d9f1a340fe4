"""The microsoft/Samba (lit_gpt) layout (samba_jax/reference_layout.py): tensors, config fields, both ways.

The reference's code is not a dependency, so `lit_gpt_state_dict_shapes` restates, from its
lit_gpt/model.py and mamba_simple.py, which tensors `GPT(Config(**fields)).state_dict()` holds.
"""

import functools
import math

import jax
import numpy as np
import pytest

from samba_jax import reference_layout as layout
from samba_jax.config import ConfigError, ConfigFileError, ModelConfig
from samba_jax.configs.base import load_experiment
from samba_jax.trainer import init_state, make_optimizer

# The fields of lit_gpt's `Config` dataclass (lit_gpt/config.py); `Config(**json)` rejects any other key.
LIT_GPT_FIELDS = {
    "org", "name", "block_size", "vocab_size", "padding_multiple", "padded_vocab_size", "n_layer", "n_head", "n_embd",
    "rotary_percentage", "parallel_residual", "bias", "local_window", "mlp", "full_per_layer", "mb_per_layer",
    "ret_per_layer", "gla_per_layer", "nope", "mamba", "sc_attn", "rms_norm", "residual_in_fp32", "fused_add_norm",
    "mamba_init", "attn_layer_pos", "use_mega", "abl_mamba", "mamba_swa_mlp", "n_query_groups",
    "shared_attention_norm", "_norm_class", "norm_eps", "_mlp_class", "intermediate_size", "condense_ratio"}


def lit_gpt_state_dict_shapes(conf):
    """name -> shape of GPT(Config(**conf)).state_dict() for the (mixer + LLaMAMLP) blocks, RMSNorm, no bias."""
    assert not conf["mamba"] and not conf["parallel_residual"] and not conf["bias"]
    d, vocab, n_head = conf["n_embd"], conf["padded_vocab_size"], conf["n_head"]
    groups, hidden, hs = conf.get("n_query_groups") or n_head, conf["intermediate_size"], d // n_head
    shapes = {"lm_head.weight": (vocab, d), "transformer.wte.weight": (vocab, d), "transformer.ln_f.weight": (d,)}
    for i in range(conf["n_layer"]):
        pre = f"transformer.h.{i}."
        if conf.get("attn_layer_pos") is not None:
            use_mamba = i not in eval(conf["attn_layer_pos"])  # what lit_gpt's Block does with the string
        else:
            per = conf.get("mb_per_layer", -1)
            use_mamba = i % per == 0 if per > 0 else False
        if use_mamba:  # mamba_simple.Mamba(n_embd): expand 2, d_state 16, d_conv 4, dt_rank ceil(d / 16)
            di, rank = 2 * d, math.ceil(d / 16)
            shapes.update({pre + "attn.in_proj.weight": (2 * di, d), pre + "attn.conv1d.weight": (di, 1, 4),
                           pre + "attn.conv1d.bias": (di,), pre + "attn.x_proj.weight": (rank + 32, di),
                           pre + "attn.dt_proj.weight": (di, rank), pre + "attn.dt_proj.bias": (di,),
                           pre + "attn.A_log": (di, 16), pre + "attn.D": (di,), pre + "attn.out_proj.weight": (d, di)})
        else:
            shapes[pre + "attn.attn.weight"] = ((n_head + 2 * groups) * hs, d)
            shapes[pre + "attn.proj.weight"] = (d, d)
        shapes.update({pre + "norm_1.weight": (d,), pre + "norm_2.weight": (d,),
                       pre + "mlp.swiglu.w1.weight": (hidden, d), pre + "mlp.swiglu.w2.weight": (hidden, d),
                       pre + "mlp.swiglu.w3.weight": (d, hidden)})
    return shapes


def lit_gpt_attention_is_local(conf, i):
    per = conf.get("full_per_layer", 1000000)
    return i % per < per - 1 and conf["local_window"] > -1


def config(pattern="mamba,mlp,swa,mlp", kv_heads=2, tie=True, **overrides):
    c = load_experiment("experiments/tiny.py")
    c.model.update({**dict(vocab_size=61, d_model=32, num_repeats=2, pattern=pattern, num_heads=4,
                           num_kv_heads=kv_heads, head_dim=8, window=6, mlp_hidden=48, compute_dtype="float32",
                           tie_embeddings=tie), **overrides})
    return ModelConfig.from_config(c.model)


@functools.lru_cache(maxsize=None)
def model(pattern="mamba,mlp,swa,mlp", kv_heads=2, tie=True):
    """(config, float32 params) of a tiny model, built once per argument set (the tests only read them)."""
    cfg = config(pattern, kv_heads, tie)
    tx, _ = make_optimizer(load_experiment("experiments/tiny.py").optimizer, 10)
    return cfg, init_state(cfg, tx, jax.random.key(0))["params"]


PATTERNS = [("mamba,mlp,swa,mlp", 2, True), ("attn,mlp", 1, False), ("swa,mlp,mamba,mlp", 4, True),
            ("mamba,mlp", 2, True), ("mamba,mlp,swa,mlp,mamba,mlp,attn,mlp", 2, False)]


@pytest.mark.parametrize("pattern,kv_heads,tie", PATTERNS)
def test_round_trip_is_bit_identical(pattern, kv_heads, tie):
    cfg, params = model(pattern, kv_heads, tie)
    back = layout.from_reference(cfg, layout.to_reference(cfg, params))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("pattern,kv_heads,tie", PATTERNS)
def test_the_config_rebuilds_exactly_these_tensors_and_reads_back(pattern, kv_heads, tie):
    cfg, params = model(pattern, kv_heads, tie)
    conf = layout.reference_config(cfg, block_size=512)
    assert set(conf) <= LIT_GPT_FIELDS
    assert conf["mamba"] is False and conf["mamba_init"] is tie and conf["block_size"] == 512
    sd = layout.to_reference(cfg, params)
    assert {k: v.shape for k, v in sd.items()} == lit_gpt_state_dict_shapes(conf)
    kinds = layout.block_kinds(cfg)
    for i, kind in enumerate(kinds):  # which attention blocks lit_gpt makes local (windowed)
        if kind != "mamba":
            assert lit_gpt_attention_is_local(conf, i) == (kind == "swa"), (i, kind, conf)
    back = layout.model_config_from_reference(conf, compute_dtype="float32")
    assert layout.block_kinds(back) == kinds
    fields = ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden", "tie_embeddings",
              "norm_eps")
    assert [getattr(back, f) for f in fields] == [getattr(cfg, f) for f in fields]
    if "swa" in kinds:
        assert back.window == cfg.window
    loaded = layout.from_reference(back, sd)
    for a, b in zip(sorted(jax.tree.leaves(loaded), key=np.size), sorted(jax.tree.leaves(params), key=np.size)):
        assert a.shape == b.shape


def test_samba_experiments_write_the_reference_presets():
    for experiment, name, (n_layer, n_embd, hidden) in (("samba_421m", "Samba_421M", (12, 1536, 4096)),
                                                        ("samba_1b", "Samba_1.3B", (18, 2304, 6144))):
        cfg = ModelConfig.from_config(load_experiment(f"experiments/{experiment}.py").model)
        conf = layout.reference_config(cfg)
        # lit_gpt/config.py's preset: mb_per_layer=2, window 2048, tied (mamba_init), vocab 32000.
        assert (conf["name"], conf["n_layer"], conf["n_embd"], conf["n_head"], conf["intermediate_size"]) == \
            (name, n_layer, n_embd, n_layer, hidden)
        assert (conf["mb_per_layer"], conf["local_window"], conf["mamba_init"], conf["vocab_size"]) == \
            (2, 2048, True, 32000)
    conf = layout.reference_config(config())
    assert conf["name"] == "samba_jax_export" and conf["mb_per_layer"] == 2


def test_names_shapes_and_fused_qkv_order():
    cfg, params = model()
    sd = layout.to_reference(cfg, params)
    # Rows grouped per KV group as [q (2 heads), k, v]: group 1's q rows are 32..47, its k rows 48..55.
    k_kernel = np.asarray(params["blocks"]["swa_2"]["k_proj"]["kernel"][0])  # (d, kv * hd)
    np.testing.assert_array_equal(sd["transformer.h.1.attn.attn.weight"][48:56], k_kernel[:, 8:16].T)
    q_kernel = np.asarray(params["blocks"]["swa_2"]["q_proj"]["kernel"][0])
    np.testing.assert_array_equal(sd["transformer.h.1.attn.attn.weight"][32:48], q_kernel[:, 16:32].T)
    # torch's Conv1d taps run oldest to newest, like our kernel's rows.
    conv = np.asarray(params["blocks"]["mamba_0"]["conv_kernel"][1])  # repeat 1 -> block 2; (d_conv, d_inner)
    np.testing.assert_array_equal(sd["transformer.h.2.attn.conv1d.weight"][:, 0, :], conv.T)
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"])  # tied: both names


@pytest.mark.parametrize("pattern,overrides,match", [
    ("mamba", {}, "no reference layout"),
    ("attn,mlp,swa,mlp", {}, "full_per_layer"),
    ("mamba,mlp,swa,mlp", {"rope_base": 500000.0}, "rope_base"),
    ("mamba,mlp,swa,mlp", {"dt_rank": 3}, "dt_rank"),
    ("mamba,mlp,swa,mlp", {"ssm_state": 8}, "ssm_state"),
])
def test_models_the_reference_cannot_build_are_refused_by_name(pattern, overrides, match):
    with pytest.raises(ConfigError, match=f"{match}.*--format=orbax"):
        layout.reference_config(config(pattern, **overrides))


def test_weights_and_config_that_disagree_are_named():
    cfg, params = model()
    sd = layout.to_reference(cfg, params)
    missing = {k: v for k, v in sd.items() if k != "transformer.h.2.attn.A_log"}
    with pytest.raises(ConfigFileError, match="transformer.h.2.attn.A_log"):
        layout.from_reference(cfg, missing)
    with pytest.raises(ConfigFileError, match="does not use.*transformer.h.9.norm_1.weight"):
        layout.from_reference(cfg, {**sd, "transformer.h.9.norm_1.weight": sd["transformer.ln_f.weight"]})
    with pytest.raises(ConfigFileError, match="lm_head.weight differs"):
        layout.from_reference(cfg, {**sd, "lm_head.weight": sd["lm_head.weight"] + 1.0})


@pytest.mark.parametrize("field,value", [("mamba", True), ("bias", True), ("parallel_residual", True),
                                         ("_norm_class", "LayerNorm"), ("gla_per_layer", 2)])
def test_reference_configs_with_other_blocks_are_refused(field, value):
    conf = layout.reference_config(config())
    layout.model_config_from_reference(conf)  # the unchanged config reads
    with pytest.raises(ConfigFileError, match=field):
        layout.model_config_from_reference({**conf, field: value})
