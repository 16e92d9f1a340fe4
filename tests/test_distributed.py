"""Multi-process training on localhost (samba_jax/distributed.py) and resuming on another mesh.

Two real processes join through `jax.distributed.initialize` (coordinator on 127.0.0.1, gloo
collectives on CPU), train a few steps on sharded global arrays and save with orbax; one process
with a different mesh restores and continues with the same losses.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from samba_jax import distributed
from samba_jax.config import ConfigError
from tests.conftest import cpu_devices_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def _env(devices):
    return cpu_devices_env(devices, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(stdout):
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[0][len("RESULT "):]) if lines else None


def test_two_processes_train_then_one_process_resumes_on_another_mesh(tmp_path):
    ckpt, port = str(tmp_path / "ckpt"), _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, "--phase=train", f"--process_id={i}", "--num_processes=2",
                               f"--port={port}", f"--ckpt={ckpt}"], cwd=ROOT, env=_env(1), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    trained = _result(outs[0][0])
    assert trained["processes"] == 2 and trained["devices"] == 2 and trained["mesh"]["fsdp"] == 2
    assert _result(outs[1][0]) is None, "only process 0 reports"

    out = subprocess.run([sys.executable, WORKER, "--phase=resume", f"--ckpt={ckpt}"], cwd=ROOT, env=_env(2),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    resumed = _result(out.stdout)
    assert resumed["processes"] == 1 and resumed["mesh"]["tensor"] == 2
    for step in ("4", "5"):
        assert resumed["losses"][step] == pytest.approx(trained["losses"][step], rel=1e-5), (resumed, trained)


def test_single_process_needs_no_runtime_and_bad_flags_are_named(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                 "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.multi_process_environment() is None
    assert distributed.initialize() is False
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert distributed.multi_process_environment() == "SLURM"
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert distributed.multi_process_environment() == "Cloud TPU pod"
    with pytest.raises(ConfigError, match="--num_processes"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)


def test_the_cli_trains_as_two_processes(tmp_path, tiny_tokenizer_workdir):
    from samba_jax.data import tokenizer as tokenizer_lib
    from tests.conftest import TINY_VOCAB
    from tests.test_train_loop import cli

    tokenizer = tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB)
    workdir, port = str(tmp_path / "run"), _free_port()
    cmd = cli(workdir, tokenizer, num_train_steps=6)
    procs = [subprocess.Popen(cmd + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                     f"--process_id={i}"], cwd=ROOT, env=_env(1), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
    assert "2 process(es), mesh {'data': 1, 'fsdp': 2" in outs[0]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6], "one writer: process 0"
    assert {r["step"] for r in records if "eval_loss" in r} == {0, 6}
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))

    # Resumed by one process: parameters and optimizer restore onto its mesh; the data order restarts.
    out = subprocess.run(cli(workdir, tokenizer, num_train_steps=8), cwd=ROOT, env=_env(1), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "written by 2 process(es) and this job has 1" in out.stderr
    assert "Resumed from checkpoint at step 6" in out.stderr + out.stdout
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps[-2:] == [7, 8]
    assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))
