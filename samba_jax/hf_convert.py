"""Hugging Face layouts for the baseline architectures, both ways: Mamba and Llama / Mistral.

- `"mamba"` pattern <-> `MambaForCausalLM` (backbone.layers.{i}.mixer.*, tied head).
- `"attn,mlp"` (Llama) and `"swa,mlp"` (Mistral, sliding window) <-> `LlamaForCausalLM` /
  `MistralForCausalLM` (model.layers.{i}.self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj).
So published Mamba and Llama/Mistral weights can be evaluated or fine-tuned here, and ours loaded
there. Tensors are numpy, names and (out, in) shapes as in transformers' state dicts; the config
dicts use transformers' field names. HF's rotate_half rotary is our half-split rotary, and its
SwiGLU is ours (gate = w1, up = w2, down = w3). Mistral's `sliding_window` counts the visible keys
including the current one, as our `window` does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samba_jax.config import ConfigError, ModelConfig


def _t(x) -> np.ndarray:
    """(in, out) <-> (out, in), keeping the dtype (a bfloat16 export stays bfloat16)."""
    return np.ascontiguousarray(np.asarray(x).T)


def mamba_to_torch(m: Any, prefix: str) -> dict[str, np.ndarray]:
    """One Mamba mixer's params (one layer) -> mamba_ssm's `Mamba` state-dict entries under `prefix`
    (the reference and transformers both use this module's names)."""
    out = {prefix + f"{name}.weight": _t(m[name]["kernel"]) for name in ("in_proj", "x_proj", "dt_proj", "out_proj")}
    out[prefix + "conv1d.weight"] = _t(m["conv_kernel"])[:, None, :]  # (d_inner, 1, d_conv)
    out[prefix + "conv1d.bias"] = np.asarray(m["conv_bias"])
    out[prefix + "dt_proj.bias"] = np.asarray(m["dt_bias"])
    out[prefix + "A_log"], out[prefix + "D"] = np.asarray(m["A_log"]), np.asarray(m["D"])
    return out


def mamba_from_torch(get: Any, prefix: str) -> dict[str, Any]:
    """The inverse of `mamba_to_torch`; get(name) returns a float32 numpy tensor."""
    m = {name: {"kernel": _t(get(prefix + f"{name}.weight"))} for name in ("in_proj", "x_proj", "dt_proj", "out_proj")}
    m.update(conv_kernel=_t(get(prefix + "conv1d.weight")[:, 0, :]), conv_bias=get(prefix + "conv1d.bias"),
             dt_bias=get(prefix + "dt_proj.bias"), A_log=get(prefix + "A_log"), D=get(prefix + "D"))
    return m


def _stack(per_layer: list[dict]) -> Any:
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *per_layer)


def _kind(cfg: ModelConfig) -> str:
    if cfg.pattern == ("mamba",):
        return "mamba"
    if cfg.pattern in (("attn", "mlp"), ("swa", "mlp")):
        return "llama"
    raise ConfigError(f"model.pattern={','.join(cfg.pattern)} has no Hugging Face layout here; only 'mamba' "
                      f"(MambaForCausalLM), 'attn,mlp' (Llama) and 'swa,mlp' (Mistral) do.")


def to_hf(cfg: ModelConfig, params: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict, transformers config fields) of a Mamba, Llama or Mistral-shaped model."""
    b = jax.tree.map(np.asarray, params["blocks"])
    emb = np.asarray(params["embed"]["embedding"])
    out: dict[str, np.ndarray] = {}
    if _kind(cfg) == "mamba":
        for i in range(cfg.num_repeats):
            m, pre = jax.tree.map(lambda x: x[i], b["mamba_0"]), f"backbone.layers.{i}."
            out[pre + "norm.weight"] = b["norm_0"]["scale"][i]
            out.update(mamba_to_torch(m, pre + "mixer."))
        out["backbone.embeddings.weight"] = emb
        out["backbone.norm_f.weight"] = np.asarray(params["final_norm"]["scale"])
        out["lm_head.weight"] = emb if cfg.tie_embeddings else _t(params["lm_head"]["kernel"])
        config = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.d_model, "state_size": cfg.ssm_state, "num_hidden_layers": cfg.num_repeats,
                  "layer_norm_epsilon": cfg.norm_eps, "expand": cfg.ssm_expand, "conv_kernel": cfg.ssm_conv,
                  "use_bias": False, "use_conv_bias": True, "time_step_rank": cfg.resolved_dt_rank,
                  "intermediate_size": cfg.d_inner, "tie_word_embeddings": cfg.tie_embeddings,
                  "residual_in_fp32": True}
        return out, config
    attn = cfg.pattern[0]
    for i in range(cfg.num_repeats):
        a, pre = jax.tree.map(lambda x: x[i], b[f"{attn}_0"]), f"model.layers.{i}."
        out[pre + "input_layernorm.weight"] = b["norm_0"]["scale"][i]
        out[pre + "post_attention_layernorm.weight"] = b["norm_1"]["scale"][i]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[pre + f"self_attn.{name}.weight"] = _t(a[name]["kernel"])
        for ours, theirs in (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")):
            out[pre + f"mlp.{theirs}.weight"] = _t(b["mlp_1"][ours]["kernel"][i])
    out["model.embed_tokens.weight"] = emb
    out["model.norm.weight"] = np.asarray(params["final_norm"]["scale"])
    out["lm_head.weight"] = emb if cfg.tie_embeddings else _t(params["lm_head"]["kernel"])
    mistral = attn == "swa"
    config = {"model_type": "mistral" if mistral else "llama",
              "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden,
              "num_hidden_layers": cfg.num_repeats, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 131072}
    if mistral:
        config["sliding_window"] = cfg.window
    return out, config


def from_hf(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[ModelConfig, Any]:
    """(model config, float32 params) from a transformers config dict and state dict."""
    kind = config.get("model_type")
    tie = bool(config.get("tie_word_embeddings", kind == "mamba"))
    get = lambda name: np.asarray(tensors[name], np.float32)  # noqa: E731
    if kind == "mamba":
        cfg = ModelConfig(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                          num_repeats=config["num_hidden_layers"], pattern=("mamba",),
                          ssm_expand=config.get("expand", 2), ssm_state=config.get("state_size", 16),
                          ssm_conv=config.get("conv_kernel", 4), dt_rank=config.get("time_step_rank", 0),
                          norm_eps=config.get("layer_norm_epsilon", 1e-5), tie_embeddings=tie)
        layers = []
        for i in range(cfg.num_repeats):
            pre = f"backbone.layers.{i}."
            layers.append({"norm_0": {"scale": get(pre + "norm.weight")},
                           "mamba_0": mamba_from_torch(get, pre + "mixer.")})
        params = {"embed": {"embedding": jnp.asarray(get("backbone.embeddings.weight"))},
                  "final_norm": {"scale": jnp.asarray(get("backbone.norm_f.weight"))}, "blocks": _stack(layers)}
    elif kind in ("llama", "mistral"):
        window = config.get("sliding_window") if kind == "mistral" else None
        heads = config["num_attention_heads"]
        cfg = ModelConfig(vocab_size=config["vocab_size"], d_model=config["hidden_size"],
                          num_repeats=config["num_hidden_layers"], pattern=("swa" if window else "attn", "mlp"),
                          num_heads=heads, num_kv_heads=config.get("num_key_value_heads", heads),
                          head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                          window=window or 2048, mlp_hidden=config["intermediate_size"],
                          rope_base=float(config.get("rope_theta", 10000.0)), norm_eps=config.get("rms_norm_eps", 1e-6),
                          tie_embeddings=tie)
        attn = cfg.pattern[0]
        layers = []
        for i in range(cfg.num_repeats):
            pre = f"model.layers.{i}."
            layers.append({
                "norm_0": {"scale": get(pre + "input_layernorm.weight")},
                "norm_1": {"scale": get(pre + "post_attention_layernorm.weight")},
                f"{attn}_0": {name: {"kernel": _t(get(pre + f"self_attn.{name}.weight"))}
                              for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
                "mlp_1": {ours: {"kernel": _t(get(pre + f"mlp.{theirs}.weight"))}
                          for ours, theirs in (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj"))},
            })
        params = {"embed": {"embedding": jnp.asarray(get("model.embed_tokens.weight"))},
                  "final_norm": {"scale": jnp.asarray(get("model.norm.weight"))}, "blocks": _stack(layers)}
    else:
        raise ConfigError(f"model_type={kind!r} is not one this converter reads; use mamba, llama or mistral")
    if not tie:
        params["lm_head"] = {"kernel": jnp.asarray(_t(get("lm_head.weight")))}
    cfg.validate()
    return cfg, params
