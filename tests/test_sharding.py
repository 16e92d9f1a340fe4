"""Meshes and rules (samba_jax/sharding.py) and sharded training against one device.

The multi-device checks run `tests/sharding_worker.py` in a child process with 8 CPU devices
(XLA reads --xla_force_host_platform_device_count only at start-up).
"""

import json
import os
import subprocess
import sys

import pytest

from samba_jax import sharding
from samba_jax.config import ConfigError, ModelConfig
from samba_jax.configs.base import load_experiment
from tests.conftest import computed_once, cpu_devices_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_eight_device_worker() -> dict:
    env = cpu_devices_env(8, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharding_worker.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.fixture(scope="module")
def eight_devices():
    return computed_once("eight_devices", _run_eight_device_worker)


@pytest.mark.parametrize("mesh", ["data", "fsdp", "tensor", "fsdp_tensor", "context", "context_chunked_loss"])
def test_every_mesh_trains_like_one_device(eight_devices, mesh):
    single, got = eight_devices["single"], eight_devices["meshes"][mesh]
    for a, b in zip(got["losses"], single):
        assert abs(a - b) <= 1e-5 * abs(b), (mesh, got["losses"], single)
    assert got["param_diff"] < 1e-5, got
    if mesh in ("fsdp", "tensor", "fsdp_tensor", "context", "context_chunked_loss"):
        assert got["sharded_leaves"] > 0, "parameters should be split across devices"
    else:
        assert got["sharded_leaves"] == 0, "pure data parallelism replicates parameters"
    traces = got["context_parallel_traces"]
    if mesh.startswith("context"):
        assert traces["scan"] > 0 and traces["attention"] > 0, traces
    else:  # a context axis of size 1 must not run the two-pass scan or the halo exchange
        assert traces == {"scan": 0, "attention": 0}, traces


def test_context_parallel_ops_equal_the_plain_ops(eight_devices):
    assert eight_devices["scan_err"] < 1e-5
    assert eight_devices["conv_err"] < 1e-5
    # Windows within one neighbour's shard (the halo) and beyond it or full ("None": ring attention).
    assert set(eight_devices["attn_err"]) == {"1", "5", "12", "13", "20", "None"}
    for window, err in eight_devices["attn_err"].items():
        assert err < 1e-5, (window, err)


def test_mesh_shape_fills_minus_one_and_names_bad_degrees():
    assert sharding.mesh_shape(dict(fsdp=-1, tensor=2), 8)["fsdp"] == 4
    assert sharding.mesh_shape(dict(data=2, fsdp=-1, dcn_data=2), 8) == {
        "data": 4, "fsdp": 2, "tensor": 1, "context": 1, "dcn_data": 2, "dcn_fsdp": 1, "dcn_tensor": 1,
        "dcn_context": 1}
    with pytest.raises(ConfigError, match="has 6 devices but 8.*-1"):
        sharding.mesh_shape(dict(fsdp=3, tensor=2), 8)
    with pytest.raises(ConfigError, match="only one axis may be -1"):
        sharding.mesh_shape(dict(fsdp=-1, data=-1), 8)
    with pytest.raises(ConfigError, match="does not divide"):
        sharding.mesh_shape(dict(fsdp=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match="mesh.tensor=0"):
        sharding.mesh_shape(dict(tensor=0), 8)


def test_shapes_the_mesh_cannot_split_are_named():
    cfg = ModelConfig.from_config(load_experiment("experiments/tiny.py").model)  # 2 heads, window 64
    sizes = dict(data=1, fsdp=1, tensor=4, context=1)
    with pytest.raises(ConfigError, match="model.num_heads=2 is not divisible by mesh.tensor=4"):
        sharding.check_model_fits_mesh(cfg, sizes, 128, 8)
    with pytest.raises(ConfigError, match="micro_batch_size=6 is not divisible by mesh.data"):
        sharding.check_model_fits_mesh(cfg, dict(sizes, tensor=1, data=4), 128, 6)
    with pytest.raises(ConfigError, match="data.seq_len=130 is not divisible by mesh.context=4"):
        sharding.check_model_fits_mesh(cfg, dict(sizes, tensor=1, context=4), 130, 8)
    sharding.check_model_fits_mesh(cfg, dict(sizes, tensor=2, context=2), 128, 8)
    # A window longer than a shard (63 earlier keys, 32 tokens per shard) runs as ring attention.
    sharding.check_model_fits_mesh(cfg, dict(sizes, tensor=1, context=4), 128, 8)
