"""Export and load (samba_jax/export.py): round trips through files, the CLI (the layout itself:
test_reference_layout.py)."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import samba_jax
from samba_jax import export
from samba_jax.config import ConfigError, ConfigFileError
from tests.conftest import cpu_devices_env


def test_bfloat16_exports_keep_the_small_ssm_and_norm_parameters_float32():
    from samba_jax import hf_convert
    from tests.test_hf_convert import ours

    cfg, params = ours("mamba", True)
    tensors, _ = hf_convert.to_hf(cfg, export.cast_params(params, "bfloat16"))
    dtype = lambda name: np.asarray(tensors[f"backbone.{name}"]).dtype.name  # noqa: E731
    for name in ("embeddings.weight", "layers.0.mixer.in_proj.weight", "layers.0.mixer.x_proj.weight",
                 "layers.0.mixer.dt_proj.weight", "layers.0.mixer.out_proj.weight"):
        assert dtype(name) == "bfloat16", name
    for name in ("norm_f.weight", "layers.0.norm.weight", "layers.0.mixer.conv1d.weight", "layers.0.mixer.conv1d.bias",
                 "layers.0.mixer.dt_proj.bias", "layers.0.mixer.A_log", "layers.0.mixer.D"):
        assert dtype(name) == "float32", name


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
        conf = json.load(f)
    with open(os.path.join(trained_workdir, "config.json")) as f:
        seq_len = json.load(f)["data"]["seq_len"]
    assert (conf["n_layer"], conf["block_size"]) == (2, seq_len)
    # What the reference writes: its config.json and the weights, without our model_config.json.
    reference_dir = tmp_path / "from_reference"
    reference_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "safetensors" / name, reference_dir / name)
    # Equal up to float32 rounding, not bitwise: the reference's config carries no scan_chunk (a speed
    # knob), so the chunked scan runs in chunks of 64, not the training run's 8, and sums in another order.
    np.testing.assert_allclose(samba_jax.load(str(reference_dir))(ids), want, rtol=1e-5, atol=1e-6)
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
    assert tensors["transformer.h.0.attn.in_proj.weight"].dtype.name == "bfloat16"
    for small in ("A_log", "D", "conv1d.weight", "conv1d.bias", "dt_proj.bias"):  # kept exact
        assert tensors[f"transformer.h.0.attn.{small}"].dtype.name == "float32", small
    assert tensors["transformer.h.0.norm_1.weight"].dtype.name == "float32"
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
    env = cpu_devices_env(8)
    script = ("import sys, jax; from samba_jax import export; "
              "_, _, p, _ = export.restore_params(sys.argv[1], sharded=True); "
              "leaf = p['embed']['embedding']; "
              "print('SHARDS', len(leaf.sharding.device_set), leaf.is_fully_replicated); "
              "export.export(sys.argv[1], sys.argv[2], 'orbax')")
    run = subprocess.run([sys.executable, "-c", script, trained_workdir, out], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "SHARDS 8 False" in run.stdout  # the embedding is split over the 8 devices, not gathered
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(samba_jax.load(out)(ids), samba_jax.load(trained_workdir)(ids))
