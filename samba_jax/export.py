"""Export trained weights, load them anywhere, and convert to and from the reference's layout.

python -m samba_jax.export --workdir=RUN --output=OUT --format=safetensors [--step=N] [--dtype=bfloat16]

- `orbax`: a params-only orbax checkpoint (OUT/params) and the model config (OUT/model_config.json).
- `safetensors`: OUT/model.safetensors in the microsoft/Samba (lit_gpt) state-dict layout, with a
  reference-style OUT/config.json (n_embd, n_layer, n_head, n_query_groups, intermediate_size,
  local_window, vocab_size, padded_vocab_size, ...), so `GPT(config).load_state_dict(...)` of the
  reference reads it; OUT/model_config.json keeps our exact config for a lossless import.
Reading a training checkpoint restores the parameters only (the optimizer state never enters
memory). `load(path)` takes a training workdir or either export and returns a callable model.

Reference layout (samba_reference.md): one reference block is a mixer and an MLP, so our pattern
must be (mixer, "mlp") pairs: Samba's "mamba,mlp,swa,mlp" repeat i is blocks 2i (Mamba) and 2i+1
(SWA). Linear weights are (out, in), the transpose of our kernels; conv1d.weight is
(d_inner, 1, d_conv); the fused QKV rows are grouped per KV group as [q_0 .. q_{g-1}, k, v].
- `hf`: OUT/model.safetensors and OUT/config.json in transformers' layout, for the baseline
  patterns (MambaForCausalLM, LlamaForCausalLM, MistralForCausalLM; see hf_convert.py); `load`
  also reads such directories published by others.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from samba_jax.config import ConfigError, ConfigFileError, ModelConfig
from samba_jax.hf_convert import mamba_from_torch, mamba_to_torch

MIXERS = ("mamba", "swa", "attn")


def _blocks(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(mixer index, mlp index) pairs of one repeat of the pattern, as reference blocks."""
    p = cfg.pattern
    if len(p) % 2 or any(p[i] not in MIXERS or p[i + 1] != "mlp" for i in range(0, len(p), 2)):
        raise ConfigError(f"model.pattern={','.join(p)} has no reference layout: the reference's blocks are a mixer "
                          f"(mamba, swa or attn) followed by an mlp. Fix: export with --format=orbax.")
    return [(i, i + 1) for i in range(0, len(p), 2)]


def to_reference(cfg: ModelConfig, params: Any) -> dict[str, np.ndarray]:
    """Our params (float32 pytree with stacked repeats) -> the reference's state dict (numpy)."""
    t = lambda x: np.ascontiguousarray(np.asarray(x).T)  # noqa: E731  (in, out) -> (out, in)
    out = {"transformer.wte.weight": np.asarray(params["embed"]["embedding"]),
           "transformer.ln_f.weight": np.asarray(params["final_norm"]["scale"])}
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


def from_reference(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Any:
    """The inverse of `to_reference`: a state dict in the reference layout -> our params pytree."""
    t = lambda x: np.ascontiguousarray(np.asarray(x, np.float32).T)  # noqa: E731
    blocks = _blocks(cfg)
    group, hd, kv, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.num_kv_heads, cfg.d_model
    per_repeat = []
    for r in range(cfg.num_repeats):
        tree: dict[str, Any] = {}
        for j, (mix, mlp) in enumerate(blocks):
            pre = f"transformer.h.{r * len(blocks) + j}."
            get = lambda name: np.asarray(tensors[pre + name], np.float32)  # noqa: E731
            tree[f"norm_{mix}"] = {"scale": get("norm_1.weight")}
            tree[f"norm_{mlp}"] = {"scale": get("norm_2.weight")}
            tree[f"mlp_{mlp}"] = {w: {"kernel": t(get(f"mlp.swiglu.{w}.weight"))} for w in ("w1", "w2", "w3")}
            kind = cfg.pattern[mix]
            if kind == "mamba":
                m = mamba_from_torch(lambda name: np.asarray(tensors[name], np.float32), pre + "attn.")
            else:
                qkv = get("attn.attn.weight").reshape(kv, group + 2, hd, d)
                m = {"q_proj": {"kernel": t(qkv[:, :group].reshape(-1, d))},
                     "k_proj": {"kernel": t(qkv[:, group].reshape(-1, d))},
                     "v_proj": {"kernel": t(qkv[:, group + 1].reshape(-1, d))},
                     "o_proj": {"kernel": t(get("attn.proj.weight"))}}
            tree[f"{kind}_{mix}"] = m
        per_repeat.append(tree)
    params = {"embed": {"embedding": np.asarray(tensors["transformer.wte.weight"], np.float32)},
              "final_norm": {"scale": np.asarray(tensors["transformer.ln_f.weight"], np.float32)},
              "blocks": jax.tree.map(lambda *xs: np.stack(xs), *per_repeat)}
    if not cfg.tie_embeddings:
        params["lm_head"] = {"kernel": t(tensors["lm_head.weight"])}
    return jax.tree.map(jnp.asarray, params)


def reference_config(cfg: ModelConfig) -> dict[str, Any]:
    """The reference's config fields for this model (lit_gpt `Config` names)."""
    blocks = len(_blocks(cfg)) * cfg.num_repeats
    return {"n_embd": cfg.d_model, "n_layer": blocks, "n_head": cfg.num_heads, "n_query_groups": cfg.num_kv_heads,
            "head_size": cfg.head_dim, "intermediate_size": cfg.mlp_hidden,
            "local_window": cfg.window if "swa" in cfg.pattern else -1, "vocab_size": cfg.vocab_size,
            "padded_vocab_size": cfg.vocab_size, "rope_base": int(cfg.rope_base), "norm_eps": cfg.norm_eps,
            "mamba": "mamba" in cfg.pattern, "bias": False, "parallel_residual": False,
            "_mlp_class": "LLaMAMLP", "_norm_class": "FusedRMSNorm", "rotary_percentage": 1.0}


def _model_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    values["pattern"] = ",".join(cfg.pattern)
    values["compute_dtype"] = "auto"  # the loading platform decides
    return values


def restore_params(workdir: str, step: int | None = None, sharded: bool = False
                   ) -> tuple[Any, ModelConfig, Any, int]:
    """(run config, model config, float32 params, step) from a training workdir, restoring only the
    parameters of its newest (or given) checkpoint: onto one device, or with `sharded` onto the run's
    mesh (config.mesh over all devices of all processes), so no host ever holds the whole model."""
    import flax.linen as nn
    import ml_collections
    import orbax.checkpoint as ocp

    from samba_jax.trainer import abstract_boxed_state, make_optimizer

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ConfigFileError(f"{workdir} holds no config.json; point at a training workdir (the --workdir of "
                              f"python -m samba_jax.train) or an export.")
    with open(path, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    cfg = ModelConfig.from_config(config.model)
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"))
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise ConfigFileError(f"{workdir}/checkpoints has no checkpoint{'' if step is None else f' at step {step}'}"
                              f" (steps: {list(manager.all_steps())}); train first or pick another step.")
    tx, _ = make_optimizer(config.optimizer, config.num_train_steps)
    boxed = abstract_boxed_state(cfg, tx)
    item = {"params": nn.unbox(boxed)["params"]}
    if sharded:
        from samba_jax import sharding

        mesh = sharding.make_mesh(config.mesh)
        targets = {"params": sharding.state_shardings(boxed, mesh, sharding.rules(config))["params"]}
    else:
        targets = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), item)
    restore_args = jax.tree.map(lambda x, s: ocp.ArrayRestoreArgs(global_shape=x.shape, dtype=x.dtype, sharding=s),
                                item, targets)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)))
    manager.close()
    return config, cfg, restored["state"]["params"], step


def export(workdir: str, output: str, fmt: str, step: int | None = None, dtype: str = "float32") -> str:
    """Writes an export of `workdir`'s checkpoint into `output` (which must not exist); returns it."""
    if fmt not in ("orbax", "safetensors", "hf"):
        raise ConfigError(f"--format={fmt!r} is not a format. Fix: use orbax, safetensors or hf.")
    if os.path.exists(output):
        raise ConfigFileError(f"--output={output} already exists; exports never overwrite. Fix: pick a new path.")
    if fmt != "orbax" and jax.process_count() > 1:
        raise ConfigError(f"--format={fmt} writes whole tensors from one process; run it as a single process, or "
                          f"export --format=orbax from every process (sharded, nothing gathered).")
    # orbax writes each device's shards itself: restore onto the run's mesh when there are several devices.
    _, cfg, params, _ = restore_params(workdir, step, sharded=fmt == "orbax" and jax.device_count() > 1)
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
    if fmt == "hf":
        from safetensors.numpy import save_file

        from samba_jax import hf_convert

        tensors, hf_config = hf_convert.to_hf(cfg, params)
        os.makedirs(output)
        save_file({k: np.array(v) for k, v in tensors.items()}, os.path.join(output, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config, f, indent=2)
        return output
    # A tied head is stored twice (as PyTorch's state_dict lists it), so a strict load_state_dict finds both.
    tensors = {k: np.array(v) for k, v in to_reference(cfg, params).items()} if fmt == "safetensors" else None
    if jax.process_index() == 0:
        os.makedirs(output)
        with open(os.path.join(output, "model_config.json"), "w", encoding="utf-8") as f:
            json.dump(_model_config_dict(cfg), f, indent=2)
    if fmt == "orbax":
        import orbax.checkpoint as ocp

        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(os.path.abspath(output), "params"), params)
        checkpointer.wait_until_finished()
    else:
        from safetensors.numpy import save_file

        save_file(tensors, os.path.join(output, "model.safetensors"),
                  metadata={"format": "pt", "layout": "microsoft/Samba lit_gpt"})
        with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
            json.dump(reference_config(cfg), f, indent=2)
    return output


class Model:
    """A loaded model: `model(ids)` maps (batch, seq) token ids to float32 logits (batch, seq, vocab)."""

    def __init__(self, cfg: ModelConfig, params: Any):
        from samba_jax.model.samba import SambaLM

        self.cfg, self.params = cfg, params
        self._apply = jax.jit(lambda p, ids: SambaLM(cfg).apply({"params": p}, ids))

    def __call__(self, ids: Any) -> jax.Array:
        return self._apply(self.params, jnp.asarray(ids, jnp.int32))


def load(path: str, step: int | None = None) -> Model:
    """A model from a training workdir, an orbax export or a safetensors export (see module doc)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        _, cfg, params, _ = restore_params(path, step)
        return Model(cfg, params)
    config_path = os.path.join(path, "model_config.json")
    hf_config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) and os.path.isfile(hf_config_path):  # a transformers directory
        from safetensors.numpy import load_file

        from samba_jax import hf_convert

        with open(hf_config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
        tensors = {}
        for name in sorted(os.listdir(path)):  # one file or shards
            if name.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(path, name)))
        return Model(*hf_convert.from_hf(hf_config, tensors))
    if not os.path.isfile(config_path):
        raise ConfigFileError(f"{path} is neither a training workdir (checkpoints/) nor an export "
                              f"(model_config.json). Fix: pass one of those directories.")
    with open(config_path, encoding="utf-8") as f:
        cfg = ModelConfig.from_config(json.load(f))
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        from safetensors.numpy import load_file

        tensors = load_file(os.path.join(path, "model.safetensors"))
        return Model(cfg, from_reference(cfg, tensors))
    import flax.linen as nn
    import orbax.checkpoint as ocp

    from samba_jax.model.samba import abstract_params

    # Restore onto this process's first device, whatever devices or mesh wrote the export.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    meta = ocp.StandardCheckpointer().metadata(os.path.join(os.path.abspath(path), "params"))
    meta_tree = getattr(meta, "item_metadata", None) or meta
    dtypes = jax.tree.map(lambda m: m.dtype, getattr(meta_tree, "tree", meta_tree))  # as exported (f32 or bf16)
    target = jax.tree.map(lambda a, dt: jax.ShapeDtypeStruct(a.shape, dt, sharding=device),
                          nn.unbox(abstract_params(cfg)), dtypes)
    params = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target)
    return Model(cfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))


def main(argv):  # pragma: no cover - exercised through the CLI test
    import sys

    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    try:
        out = export(f.workdir, f.output, f.format, f.step, f.dtype)
    except ConfigError as e:
        print(f"ERROR ({type(e).__name__}): {e}", file=sys.stderr)
        sys.exit(2)
    print(f"Wrote {f.format} export to {out}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "Training workdir to export.")
    flags.DEFINE_string("output", None, "New directory for the export.")
    flags.DEFINE_enum("format", "safetensors", ["orbax", "safetensors", "hf"], "Export format (hf: "
                      "transformers' layout, for mamba / attn,mlp / swa,mlp patterns).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)
