"""Export and load (samba_jax/export.py): round trips, the reference layout, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import samba_jax
from samba_jax import export
from samba_jax.config import ConfigError, ConfigFileError, ModelConfig
from samba_jax.configs.base import load_experiment
from samba_jax.trainer import init_state, make_optimizer


def model(pattern="mamba,mlp,swa,mlp", kv_heads=2, tie=True):
    c = load_experiment("experiments/tiny.py")
    c.model.update(vocab_size=61, d_model=32, num_repeats=2, pattern=pattern, num_heads=4, num_kv_heads=kv_heads,
                   head_dim=8, window=6, mlp_hidden=48, compute_dtype="float32", tie_embeddings=tie)
    cfg = ModelConfig.from_config(c.model)
    tx, _ = make_optimizer(c.optimizer, 10)
    return cfg, init_state(cfg, tx, jax.random.key(0))["params"]


@pytest.mark.parametrize("pattern,kv_heads,tie", [("mamba,mlp,swa,mlp", 2, True), ("attn,mlp", 1, False),
                                                  ("swa,mlp,mamba,mlp", 4, True)])
def test_reference_layout_round_trip_is_bit_identical(pattern, kv_heads, tie):
    cfg, params = model(pattern, kv_heads, tie)
    back = export.from_reference(cfg, export.to_reference(cfg, params))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_reference_names_shapes_and_fused_qkv_order():
    cfg, params = model()
    sd = export.to_reference(cfg, params)
    d, di, rank = cfg.d_model, cfg.d_inner, cfg.resolved_dt_rank
    assert sd["transformer.h.0.attn.in_proj.weight"].shape == (2 * di, d)
    assert sd["transformer.h.0.attn.conv1d.weight"].shape == (di, 1, 4)
    assert sd["transformer.h.0.attn.x_proj.weight"].shape == (rank + 32, di)
    assert sd["transformer.h.0.attn.A_log"].shape == (di, 16)
    assert sd["transformer.h.1.attn.attn.weight"].shape == ((4 + 2 * 2) * 8, d)
    assert sd["transformer.h.3.mlp.swiglu.w3.weight"].shape == (d, cfg.mlp_hidden)
    assert len([k for k in sd if k.endswith("norm_1.weight")]) == 4  # 2 repeats x (Mamba block, SWA block)
    # Rows grouped per KV group as [q (2 heads), k, v]: group 1's k rows are rows 48..55.
    k_kernel = np.asarray(params["blocks"]["swa_2"]["k_proj"]["kernel"][0])  # (d, kv * hd)
    np.testing.assert_array_equal(sd["transformer.h.1.attn.attn.weight"][48:56], k_kernel[:, 8:16].T)
    q_kernel = np.asarray(params["blocks"]["swa_2"]["q_proj"]["kernel"][0])
    np.testing.assert_array_equal(sd["transformer.h.1.attn.attn.weight"][32:48], q_kernel[:, 16:32].T)
    conf = export.reference_config(cfg)
    assert (conf["n_embd"], conf["n_layer"], conf["n_head"], conf["n_query_groups"], conf["intermediate_size"],
            conf["local_window"], conf["vocab_size"]) == (32, 4, 4, 2, 48, 6, 61)


def test_patterns_without_a_reference_layout_are_named():
    cfg, params = model("mamba")
    with pytest.raises(ConfigError, match="no reference layout.*--format=orbax"):
        export.to_reference(cfg, params)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, tiny_tokenizer_workdir):
    from samba_jax.data import tokenizer as tokenizer_lib
    from samba_jax.train_loop import train_and_evaluate
    from tests.conftest import TINY_VOCAB
    from tests.test_train_loop import tiny_config

    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    tokenizer = tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB)
    train_and_evaluate(tiny_config(tokenizer, 3), workdir)
    return workdir


def test_exports_load_back_with_the_same_logits(trained_workdir, tmp_path):
    ids = np.arange(20, dtype=np.int32).reshape(2, 10) % 97
    want = samba_jax.load(trained_workdir)(ids)
    assert want.shape == (2, 10, 512) and want.dtype == jnp.float32
    for fmt in ("orbax", "safetensors"):
        out = export.export(trained_workdir, str(tmp_path / fmt), fmt)
        got = samba_jax.load(out)(ids)
        np.testing.assert_array_equal(got, want)
    with open(tmp_path / "safetensors" / "config.json") as f:
        assert json.load(f)["n_layer"] == 2
    with pytest.raises(ConfigFileError, match="never overwrite"):
        export.export(trained_workdir, str(tmp_path / "orbax"), "orbax")


def test_the_cli_writes_bfloat16_safetensors(trained_workdir, tmp_path):
    from safetensors.numpy import load_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "bf16")
    run = subprocess.run([sys.executable, "-m", "samba_jax.export", f"--workdir={trained_workdir}", f"--output={out}",
                          "--format=safetensors", "--dtype=bfloat16"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    tensors = load_file(os.path.join(out, "model.safetensors"))
    assert tensors["transformer.wte.weight"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(tensors["lm_head.weight"], tensors["transformer.wte.weight"])  # tied, both keys
    logits = samba_jax.load(out)(np.zeros((1, 4), np.int32))
    assert bool(jnp.all(jnp.isfinite(logits)))
    missing = subprocess.run([sys.executable, "-m", "samba_jax.export", f"--workdir={tmp_path}/none",
                              f"--output={tmp_path}/x"], cwd=root, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no config.json" in missing.stderr


def test_patterns_without_a_layout_leave_no_directory(trained_workdir, tmp_path):
    with pytest.raises(ConfigError, match="no Hugging Face layout"):
        export.export(trained_workdir, str(tmp_path / "hf"), "hf")
    assert not os.path.exists(tmp_path / "hf")


def test_orbax_export_on_eight_devices_restores_sharded_and_loads_back(trained_workdir, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "sharded")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = ("import sys, jax; from samba_jax import export; "
              "_, _, p, _ = export.restore_params(sys.argv[1], sharded=True); "
              "leaf = p['embed']['embedding']; print('SHARDS', len(leaf.sharding.device_set), leaf.is_fully_replicated); "
              "export.export(sys.argv[1], sys.argv[2], 'orbax')")
    run = subprocess.run([sys.executable, "-c", script, trained_workdir, out], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "SHARDS 8 False" in run.stdout  # the embedding is split over the 8 devices, not gathered
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(samba_jax.load(out)(ids), samba_jax.load(trained_workdir)(ids))
