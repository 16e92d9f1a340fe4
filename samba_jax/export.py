"""Export trained weights, load them anywhere, and convert to and from the reference's layout.

python -m samba_jax.export --workdir=RUN --output=OUT --format=safetensors [--step=N] [--dtype=bfloat16]

- `orbax`: a params-only orbax checkpoint (OUT/params) and the model config (OUT/model_config.json).
- `safetensors`: OUT/model.safetensors in the microsoft/Samba (lit_gpt) state-dict layout, with
  OUT/config.json holding lit_gpt `Config` fields that rebuild the same blocks (n_embd, n_layer,
  n_head, n_query_groups, intermediate_size, local_window, vocab_size, padded_vocab_size,
  mb_per_layer / attn_layer_pos, full_per_layer, mamba_init, ...; reference_layout.py), so the
  reference's `GPT(Config(**config)).load_state_dict(..., strict=True)` reads it; OUT/model_config.json
  keeps our exact config for a lossless import.
- `--dtype=bfloat16` stores the matmul weights and embeddings in bfloat16 and keeps `KEEP_FLOAT32` in float32.
Reading a training checkpoint restores the parameters only (the optimizer state never enters
memory). `load(path)` takes a training workdir, any export, a directory written by the reference
(model.safetensors + its config.json) or a transformers directory, and returns a callable model.
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
from samba_jax.reference_layout import from_reference, model_config_from_reference, reference_config, to_reference

# Small, precision-sensitive parameters a bfloat16 export keeps in float32 (the reference keeps them float32 too):
# the SSM's A_log, D, dt bias and conv, and every norm scale.
KEEP_FLOAT32 = ("A_log", "D", "conv_kernel", "conv_bias", "dt_bias", "scale")


def cast_params(params: Any, dtype: str) -> Any:
    """The params as stored by an export: `dtype`, except KEEP_FLOAT32 leaves, which stay float32."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.astype(jnp.float32 if path[-1].key in KEEP_FLOAT32 else jnp.dtype(dtype)), params)


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
    run_config, cfg, params, _ = restore_params(workdir, step, sharded=fmt == "orbax" and jax.device_count() > 1)
    if fmt == "safetensors":
        ref_config = reference_config(cfg, block_size=run_config.data.seq_len)  # refuses before anything is written
    params = cast_params(params, dtype)
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
            json.dump(ref_config, f, indent=2)
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
    other_config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path) and os.path.isfile(other_config_path):  # the reference's or transformers'
        from safetensors.numpy import load_file

        from samba_jax import hf_convert

        with open(other_config_path, encoding="utf-8") as f:
            other_config = json.load(f)
        tensors = {}
        for name in sorted(os.listdir(path)):  # one file or shards
            if name.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(path, name)))
        if "n_embd" in other_config and "model_type" not in other_config:  # lit_gpt field names: the reference
            cfg = model_config_from_reference(other_config)
            return Model(cfg, from_reference(cfg, tensors))
        return Model(*hf_convert.from_hf(other_config, tensors))
    if not os.path.isfile(config_path):
        raise ConfigFileError(f"{path} is neither a training workdir (checkpoints/) nor an export "
                              f"(model_config.json or config.json). Fix: pass one of those directories.")
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
