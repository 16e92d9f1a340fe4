"""Run by tests/test_sharding.py in a child process with 8 CPU devices (XLA_FLAGS is read at start-up).

Prints one JSON line: per mesh, the losses of a few train steps and the largest parameter difference
from the same steps on one device; and the context-parallel ops against the plain ones.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from samba_jax import context_parallel, sharding
from samba_jax.config import ModelConfig
from samba_jax.configs.base import load_experiment
from samba_jax.model.samba import SambaLM
from samba_jax.ops.attention import sliding_window_attention
from samba_jax.ops.selective_scan import selective_scan
from samba_jax.trainer import abstract_boxed_state, init_state, make_optimizer, make_train_step

SEQ, BATCH, STEPS = 64, 8, 3
MESHES = {
    "data": dict(data=8, fsdp=1),
    "fsdp": dict(fsdp=8),
    "tensor": dict(fsdp=1, data=4, tensor=2),
    "fsdp_tensor": dict(fsdp=4, tensor=2),
    "context": dict(fsdp=2, context=4),
    # The head + loss in 4 strided groups of positions, each still split over the context axis.
    "context_chunked_loss": dict(fsdp=2, context=4, loss_chunks=4),
}


def config():
    c = load_experiment("experiments/tiny.py")
    c.model.update(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, window=16, mlp_hidden=128,
                   compute_dtype="float32")
    return c


def train(model_cfg, c, tokens, mesh_cfg=None):
    tx, schedule = make_optimizer(c.optimizer, 100)
    model = SambaLM(model_cfg)
    state = init_state(model_cfg, tx, jax.random.key(0))
    if mesh_cfg is None:
        step = make_train_step(model, tx, schedule)
    else:
        mesh = sharding.make_mesh(mesh_cfg)
        rules = sharding.DEFAULT_RULES
        shardings = sharding.state_shardings(abstract_boxed_state(model_cfg, tx), mesh, rules)
        state = jax.device_put(state, shardings)
        batch = sharding.batch_sharding(mesh, rules)
        step = make_train_step(model, tx, schedule, mesh=mesh, rule_table=rules, state_sharding=shardings,
                               batch_sharding=batch)
        tokens = [jax.device_put(t, batch) for t in tokens]
    losses = []
    for t in tokens:
        state, m = step(state, t)
        losses.append(float(m["loss"]))
    sharded_leaves = sum(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                         for x in jax.tree.leaves(state["params"])) if mesh_cfg else 0
    return losses, jax.device_get(state["params"]), sharded_leaves


def context_ops():
    mesh = sharding.make_mesh(dict(fsdp=2, context=4))
    k = jax.random.split(jax.random.key(1), 8)
    b, L, d, n = 2, 48, 8, 4
    args = dict(u=jax.random.normal(k[0], (b, L, d)), delta=0.5 * jax.random.normal(k[1], (b, L, d)),
                A=-jnp.exp(jax.random.normal(k[2], (d, n))), B=jax.random.normal(k[3], (b, L, n)),
                C=jax.random.normal(k[4], (b, L, n)), D=jax.random.normal(k[5], (d,)),
                z=jax.random.normal(k[6], (b, L, d)), delta_bias=jax.random.normal(k[7], (d,)) - 1.0)
    weights = jnp.cos(jnp.arange(b * L * d, dtype=jnp.float32)).reshape(b, L, d)

    def scan_loss(fn, a):
        return jnp.sum(fn(**a, delta_softplus=True, implementation="reference") * weights)

    def on_mesh(fn):
        def run(*xs):
            with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
                return jax.jit(fn)(*xs)
        return run

    want = jax.value_and_grad(lambda a: scan_loss(selective_scan, a))(args)
    got = on_mesh(jax.value_and_grad(lambda a: scan_loss(context_parallel.selective_scan_on_mesh, a)))(args)
    scan_err = max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-9))
                   for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)))

    q = jax.random.normal(k[0], (b, L, 4, 8))
    kk, v = jax.random.normal(k[1], (b, L, 2, 8)), jax.random.normal(k[2], (b, L, 2, 8))
    attn_err = {}
    # 13 = local length + 1: the halo is the whole previous shard; 20 and None (full): ring attention.
    for window in (1, 5, 12, 13, 20, None):
        def loss(fn, q, kk, v, window=window):
            return jnp.sum(jnp.sin(fn(q, kk, v, window, implementation="reference")))
        want = jax.value_and_grad(lambda *x: loss(sliding_window_attention, *x), argnums=(0, 1, 2))(q, kk, v)
        got = on_mesh(jax.value_and_grad(lambda *x: loss(context_parallel.sliding_window_attention_on_mesh, *x),
                                         argnums=(0, 1, 2)))(q, kk, v)
        attn_err[str(window)] = max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-9))
                               for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    # Mamba's causal conv (width 4: a 3-input halo from the previous shard), values and gradients.
    from samba_jax.model.mamba import causal_depthwise_conv

    conv_kernel, conv_bias = jax.random.normal(k[3], (4, d)), jax.random.normal(k[4], (d,))

    def conv_loss(fn, x, w, bias):
        return jnp.sum(fn(x, w, bias) * weights)

    plain = lambda x, w, bias: causal_depthwise_conv(x, w, bias)  # noqa: E731
    sharded = lambda x, w, bias: context_parallel.causal_conv_on_mesh(x, w, bias, causal_depthwise_conv)  # noqa: E731
    want = jax.value_and_grad(lambda *x: conv_loss(plain, *x), argnums=(0, 1, 2))(args["u"], conv_kernel, conv_bias)
    got = on_mesh(jax.value_and_grad(lambda *x: conv_loss(sharded, *x), argnums=(0, 1, 2)))(
        args["u"], conv_kernel, conv_bias)
    conv_err = max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-9))
                   for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return scan_err, attn_err, conv_err


def main():
    assert jax.device_count() == 8, jax.devices()
    c = config()
    model_cfg = ModelConfig.from_config(c.model)
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 256, (1, BATCH, SEQ + 1), np.int32) for _ in range(STEPS)]
    base_losses, base_params, _ = train(model_cfg, c, tokens)
    out = {"single": base_losses, "meshes": {}}
    # Count traces of the two-pass context-parallel paths: only meshes that split the sequence may use them.
    traced = {"scan": 0, "attention": 0}
    for key, fn_name in (("scan", "scan_across_shards"), ("attention", "attention_across_shards")):
        original = getattr(context_parallel, fn_name)

        def counting(*args, _original=original, _key=key, **kwargs):
            traced[_key] += 1
            return _original(*args, **kwargs)

        setattr(context_parallel, fn_name, counting)
    for name, mesh_cfg in MESHES.items():
        mesh_cfg = dict(mesh_cfg)
        cfg = dataclasses.replace(model_cfg, loss_chunks=mesh_cfg.pop("loss_chunks", 0))
        traced.update(scan=0, attention=0)
        losses, params, sharded = train(cfg, c, tokens, mesh_cfg)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params)))
        out["meshes"][name] = {"losses": losses, "param_diff": diff, "sharded_leaves": int(sharded),
                               "context_parallel_traces": dict(traced)}
    out["scan_err"], out["attn_err"], out["conv_err"] = context_ops()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
