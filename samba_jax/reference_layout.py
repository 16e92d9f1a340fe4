"""The microsoft/Samba (lit_gpt) checkpoint layout, both ways: state dict and `Config` fields.

One reference block is a mixer and an MLP (`transformer.h.{i}`: norm_1, attn, norm_2, mlp), so our
pattern must be (mixer, "mlp") pairs: Samba's "mamba,mlp,swa,mlp" repeat r is blocks 2r (Mamba) and
2r+1 (SWA). Linear weights are (out, in), the transpose of our kernels; conv1d.weight is
(d_inner, 1, d_conv); the fused QKV rows are grouped per KV group as [q_0 .. q_{g-1}, k, v].

Which block is which is not stored in the tensors but rebuilt by the reference's `Block` from its
config: block i is Mamba if `i not in eval(attn_layer_pos)` when that is set, else if
`i % mb_per_layer == 0` (mb_per_layer > 0); an attention block is local (window `local_window`,
flash-attn window (local_window - 1, 0), i.e. our `window`) when `i % full_per_layer <
full_per_layer - 1` and local_window > -1. `reference_config` writes the fields that rebuild our
layout and refuses what lit_gpt cannot express; `model_config_from_reference` reads them back, so a
checkpoint trained with the reference loads here too:

    import json, safetensors.torch
    from lit_gpt.model import GPT, Config
    model = GPT(Config(**json.load(open("OUT/config.json"))))
    model.load_state_dict(safetensors.torch.load_file("OUT/model.safetensors"), strict=True)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samba_jax.config import ConfigError, ConfigFileError, ModelConfig
from samba_jax.hf_convert import mamba_from_torch, mamba_to_torch

MIXERS = ("mamba", "swa", "attn")
UNLIMITED = 1000000  # lit_gpt's default full_per_layer: every attention block local
# lit_gpt's named configs with our architectures (config.py); `name` is written only on an exact match.
PRESETS = {
    "Samba_421M": dict(n_layer=12, n_head=12, n_query_groups=12, n_embd=1536, intermediate_size=4096),
    "Samba_1.3B": dict(n_layer=18, n_head=18, n_query_groups=18, n_embd=2304, intermediate_size=6144),
}
_NO_LAYOUT = "Fix: export with --format=orbax (our own layout, any model)."


def _blocks(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(mixer index, mlp index) pairs of one repeat of the pattern, as reference blocks."""
    p = cfg.pattern
    if len(p) % 2 or any(p[i] not in MIXERS or p[i + 1] != "mlp" for i in range(0, len(p), 2)):
        raise ConfigError(f"model.pattern={','.join(p)} has no reference layout: the reference's blocks are a mixer "
                          f"(mamba, swa or attn) followed by an mlp. {_NO_LAYOUT}")
    return [(i, i + 1) for i in range(0, len(p), 2)]


def block_kinds(cfg: ModelConfig) -> list[str]:
    """The mixer of every reference block of the whole model, e.g. [mamba, swa, mamba, swa, ...]."""
    return [cfg.pattern[mix] for mix, _ in _blocks(cfg)] * cfg.num_repeats


def to_reference(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Our params (float32 pytree with stacked repeats) -> the reference's state dict (numpy)."""
    t = lambda x: np.ascontiguousarray(np.asarray(x).T)  # noqa: E731  (in, out) -> (out, in)
    out = {"transformer.wte.weight": np.asarray(params["embed"]["embedding"]),
           "transformer.ln_f.weight": np.asarray(params["final_norm"]["scale"])}
    # A tied head is stored under both names, as PyTorch's state_dict lists it, so a strict load finds both.
    out["lm_head.weight"] = out["transformer.wte.weight"] if cfg.tie_embeddings else t(params["lm_head"]["kernel"])
    blocks, b = _blocks(cfg), params["blocks"]
    group = cfg.num_heads // cfg.num_kv_heads
    for r in range(cfg.num_repeats):
        for j, (mix, mlp) in enumerate(blocks):
            pre = f"transformer.h.{r * len(blocks) + j}."
            take = lambda tree: jax.tree.map(lambda x: np.asarray(x[r]), tree)  # noqa: E731
            out[pre + "norm_1.weight"] = take(b[f"norm_{mix}"])["scale"]
            out[pre + "norm_2.weight"] = take(b[f"norm_{mlp}"])["scale"]
            for w in ("w1", "w2", "w3"):
                out[pre + f"mlp.swiglu.{w}.weight"] = t(take(b[f"mlp_{mlp}"])[w]["kernel"])
            kind = cfg.pattern[mix]
            m = take(b[f"{kind}_{mix}"])
            if kind == "mamba":
                out.update(mamba_to_torch(m, pre + "attn."))
            else:
                hd, kv, d = cfg.head_dim, cfg.num_kv_heads, cfg.d_model
                q = t(m["q_proj"]["kernel"]).reshape(kv, group, hd, d)
                k = t(m["k_proj"]["kernel"]).reshape(kv, 1, hd, d)
                v = t(m["v_proj"]["kernel"]).reshape(kv, 1, hd, d)
                out[pre + "attn.attn.weight"] = np.concatenate([q, k, v], axis=1).reshape(-1, d)
                out[pre + "attn.proj.weight"] = t(m["o_proj"]["kernel"])
    return out


class _Tensors:
    """Reads a state dict by name, remembering what was read, so missing and unused keys are both named."""

    def __init__(self, tensors: dict[str, Any]):
        self.tensors, self.read = tensors, set()

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ConfigFileError(f"the checkpoint has no tensor {name!r}, which this model config needs; the config "
                                  f"and the weights disagree. Fix: export both from the same model.")
        self.read.add(name)
        return np.asarray(self.tensors[name], np.float32)


def from_reference(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Any:
    """The inverse of `to_reference`: a state dict in the reference layout -> our params pytree.
    Every tensor must be used (a tied model's lm_head.weight must equal the embedding)."""
    t = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).T)  # noqa: E731
    get = _Tensors(tensors)
    blocks = _blocks(cfg)
    group, hd, kv, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.num_kv_heads, cfg.d_model
    per_repeat = []
    for r in range(cfg.num_repeats):
        tree: dict[str, Any] = {}
        for j, (mix, mlp) in enumerate(blocks):
            pre = f"transformer.h.{r * len(blocks) + j}."
            tree[f"norm_{mix}"] = {"scale": get(pre + "norm_1.weight")}
            tree[f"norm_{mlp}"] = {"scale": get(pre + "norm_2.weight")}
            tree[f"mlp_{mlp}"] = {w: {"kernel": t(get(pre + f"mlp.swiglu.{w}.weight"))} for w in ("w1", "w2", "w3")}
            kind = cfg.pattern[mix]
            if kind == "mamba":
                m = mamba_from_torch(get, pre + "attn.")
            else:
                qkv = get(pre + "attn.attn.weight").reshape(kv, group + 2, hd, d)
                m = {"q_proj": {"kernel": t(qkv[:, :group].reshape(-1, d))},
                     "k_proj": {"kernel": t(qkv[:, group].reshape(-1, d))},
                     "v_proj": {"kernel": t(qkv[:, group + 1].reshape(-1, d))},
                     "o_proj": {"kernel": t(get(pre + "attn.proj.weight"))}}
            tree[f"{kind}_{mix}"] = m
        per_repeat.append(tree)
    params = {"embed": {"embedding": get("transformer.wte.weight")},
              "final_norm": {"scale": get("transformer.ln_f.weight")},
              "blocks": jax.tree.map(lambda *xs: np.stack(xs), *per_repeat)}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": t(get("lm_head.weight"))}
    elif "lm_head.weight" in tensors:
        if not np.array_equal(get("lm_head.weight"), params["embed"]["embedding"]):
            raise ConfigFileError("lm_head.weight differs from transformer.wte.weight but the config ties them "
                                  "(mamba_init / tie_embeddings); loading would drop the head. Fix: set "
                                  "mamba_init=false (tie_embeddings=False) for this checkpoint.")
    unused = sorted(set(tensors) - get.read)
    if unused:
        raise ConfigFileError(f"the checkpoint has {len(unused)} tensor(s) this model config does not use, e.g. "
                              f"{unused[:3]}; the config and the weights disagree. Fix: export both from the same "
                              f"model.")
    return jax.tree.map(jnp.asarray, params)


def _full_per_layer(kinds: list[str]) -> int:
    """lit_gpt's full_per_layer F: attention block i is full attention iff i % F == F - 1."""
    attention = [(i, k) for i, k in enumerate(kinds) if k != "mamba"]
    if all(k == "swa" for _, k in attention) or all(k == "attn" for _, k in attention):
        return UNLIMITED  # one kind: local_window alone decides
    for f in range(2, len(kinds) + 1):
        if all((i % f == f - 1) == (k == "attn") for i, k in attention):
            return f
    raise ConfigError(f"the blocks {kinds} mix swa and attn in a way lit_gpt's full_per_layer (full attention at "
                      f"every F-th block, counting Mamba blocks) cannot express. {_NO_LAYOUT}")


def reference_config(cfg: ModelConfig, block_size: int = 4096) -> dict[str, Any]:
    """lit_gpt `Config(**fields)` that rebuilds this model's blocks (block_size: the training length,
    the reference's first RoPE table)."""
    kinds = block_kinds(cfg)
    checks = [("rope_base", cfg.rope_base, 10000.0, "lit_gpt always uses RoPE base 10000"),
              ("ssm_state", cfg.ssm_state, 16, "lit_gpt's Mamba uses mamba_ssm's defaults"),
              ("ssm_conv", cfg.ssm_conv, 4, "lit_gpt's Mamba uses mamba_ssm's defaults"),
              ("ssm_expand", cfg.ssm_expand, 2, "lit_gpt's Mamba uses mamba_ssm's defaults"),
              ("dt_rank", cfg.resolved_dt_rank, math.ceil(cfg.d_model / 16), "lit_gpt's Mamba uses dt_rank 'auto'")]
    for field, value, want, why in checks:
        if value != want:
            raise ConfigError(f"model.{field}={value} has no reference layout ({why}: {want}). {_NO_LAYOUT}")
    conf: dict[str, Any] = {
        "org": "samba_jax", "name": "samba_jax_export", "block_size": int(block_size),
        "vocab_size": cfg.vocab_size, "padding_multiple": 64, "padded_vocab_size": cfg.vocab_size,
        "n_layer": len(kinds), "n_head": cfg.num_heads, "n_query_groups": cfg.num_kv_heads, "n_embd": cfg.d_model,
        "intermediate_size": cfg.mlp_hidden, "local_window": cfg.window if "swa" in kinds else -1,
        "full_per_layer": _full_per_layer(kinds), "mamba": False, "mamba_init": cfg.tie_embeddings,
        "rotary_percentage": 1.0, "parallel_residual": False, "bias": False, "norm_eps": cfg.norm_eps,
        "_norm_class": "FusedRMSNorm", "_mlp_class": "LLaMAMLP"}
    mamba = [k == "mamba" for k in kinds]
    if mamba == [i % 2 == 0 for i in range(len(kinds))]:
        conf["mb_per_layer"] = 2  # Samba's own alternation, as the presets write it
    elif all(mamba):
        conf["mb_per_layer"] = 1
    elif any(mamba):
        conf["attn_layer_pos"] = str([i for i, is_mamba in enumerate(mamba) if not is_mamba])
    for name, fields in PRESETS.items():
        if (all(conf[k] == v for k, v in fields.items()) and conf.get("mb_per_layer") == 2 and conf["local_window"]
                == 2048 and conf["full_per_layer"] == UNLIMITED and conf["vocab_size"] == 32000
                and cfg.tie_embeddings and conf["norm_eps"] == 1e-5):
            conf.update(org="Microsoft", name=name)
    return conf


_UNSUPPORTED = {"mamba": False, "mamba_swa_mlp": False, "use_mega": False, "abl_mamba": False, "nope": False,
                "sc_attn": False, "parallel_residual": False, "bias": False, "rotary_percentage": 1.0, "mlp": True,
                "shared_attention_norm": False, "ret_per_layer": -1, "gla_per_layer": -1, "condense_ratio": 1,
                "_mlp_class": "LLaMAMLP"}


def model_config_from_reference(conf: dict[str, Any], **overrides: Any) -> ModelConfig:
    """Our ModelConfig for a lit_gpt config (a dict of its `Config` fields, e.g. its config.json)."""
    for field, supported in _UNSUPPORTED.items():
        if field in conf and conf[field] != supported and not (field.endswith("per_layer") and conf[field] <= 0):
            raise ConfigFileError(f"reference config field {field}={conf[field]!r} builds blocks samba_jax does not "
                                  f"have (supported: {supported!r}).")
    if conf.get("_norm_class", "FusedRMSNorm") not in ("RMSNorm", "FusedRMSNorm"):
        raise ConfigFileError(f"reference config field _norm_class={conf['_norm_class']!r}: only RMSNorm models load.")
    missing = [f for f in ("n_embd", "n_layer", "n_head") if f not in conf]
    if missing:
        raise ConfigFileError(f"reference config lacks {missing}; it is not a lit_gpt Config.")
    n, d, heads = int(conf["n_layer"]), int(conf["n_embd"]), int(conf["n_head"])
    window = int(conf.get("local_window", -1))
    full_every = int(conf.get("full_per_layer", UNLIMITED))
    kinds = []
    for i in range(n):
        if conf.get("attn_layer_pos") is not None:
            is_mamba = i not in [int(x) for x in str(conf["attn_layer_pos"]).strip("[]() ").split(",") if x.strip()]
        else:
            per = int(conf.get("mb_per_layer", -1))
            is_mamba = per > 0 and i % per == 0
        local = i % full_every < full_every - 1 and window > -1
        kinds.append("mamba" if is_mamba else "swa" if local else "attn")
    period = next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))
    vocab = conf.get("padded_vocab_size") or conf.get("vocab_size")
    if not conf.get("padded_vocab_size") and vocab % conf.get("padding_multiple", 512):
        vocab += conf.get("padding_multiple", 512) - vocab % conf.get("padding_multiple", 512)
    values = dict(vocab_size=int(vocab), d_model=d, num_repeats=n // period,
                  pattern=tuple(x for k in kinds[:period] for x in (k, "mlp")), num_heads=heads,
                  num_kv_heads=int(conf.get("n_query_groups") or heads), head_dim=d // heads,
                  mlp_hidden=int(conf.get("intermediate_size") or 4 * d), norm_eps=float(conf.get("norm_eps", 1e-5)),
                  tie_embeddings=bool(conf.get("mamba_init", False)), rope_base=10000.0, compute_dtype="auto")
    if window > -1:
        values["window"] = window
    values.update(overrides)
    return ModelConfig.from_config(values)
