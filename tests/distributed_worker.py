"""Run by tests/test_distributed.py: one process of a multi-process CPU job, or the single-process resume.

phase "train": process PID of N (one CPU device each, mesh fsdp=N) trains steps 1..5 on fixed
global batches, saving an orbax checkpoint after step 3; process 0 prints the losses.
phase "resume": one process with 2 CPU devices and a different mesh (tensor=2) restores step 3 and
trains steps 4..5 on the same batches; prints the losses.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from samba_jax import distributed, sharding
from samba_jax.config import ModelConfig
from samba_jax.configs.base import load_experiment
from samba_jax.model.samba import SambaLM
from samba_jax.trainer import abstract_boxed_state, init_state_on_mesh, make_optimizer, make_train_step

SEQ, BATCH = 32, 4


def batch(step):
    return np.random.default_rng(step).integers(0, 256, (1, BATCH, SEQ + 1), np.int32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--phase", choices=("train", "resume"))
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ckpt")
    a = p.parse_args()
    if a.phase == "train":
        distributed.initialize(f"127.0.0.1:{a.port}", a.num_processes, a.process_id)
        mesh_cfg = dict(fsdp=-1)
    else:
        mesh_cfg = dict(fsdp=1, tensor=2)

    c = load_experiment("experiments/tiny.py")
    c.model.update(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, window=16, mlp_hidden=128,
                   compute_dtype="float32")
    model_cfg = ModelConfig.from_config(c.model)
    tx, schedule = make_optimizer(c.optimizer, 100)
    mesh, rules = sharding.make_mesh(mesh_cfg), sharding.DEFAULT_RULES
    boxed = abstract_boxed_state(model_cfg, tx)
    shardings = sharding.state_shardings(boxed, mesh, rules)
    tokens_sharding = sharding.batch_sharding(mesh, rules)
    step_fn = make_train_step(SambaLM(model_cfg), tx, schedule, mesh=mesh, rule_table=rules,
                              state_sharding=shardings, batch_sharding=tokens_sharding)
    manager = ocp.CheckpointManager(a.ckpt)

    def global_batch(step):  # every process knows the global batch and fills its own shards
        data = batch(step)
        return jax.make_array_from_callback(data.shape, tokens_sharding, lambda index: data[index])

    if a.phase == "train":
        state, first = init_state_on_mesh(model_cfg, tx, jax.random.key(0), shardings), 1
    else:
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(boxed), shardings)
        state, first = manager.restore(3, args=ocp.args.StandardRestore(abstract)), 4
    losses = {}
    for step in range(first, 6):
        state, metrics = step_fn(state, global_batch(step))
        losses[step] = float(metrics["loss"])
        if step == 3 and a.phase == "train":
            manager.save(3, args=ocp.args.StandardSave(state))
            manager.wait_until_finished()
    manager.close()
    if jax.process_index() == 0:
        print("RESULT " + json.dumps({"losses": losses, "processes": jax.process_count(),
                                      "devices": jax.device_count(), "mesh": dict(mesh.shape)}), flush=True)


if __name__ == "__main__":
    main()
