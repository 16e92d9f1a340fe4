"""End-to-end runs of the training loop on the default corpus: loss falls, resume is exact, signals save."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from samba_jax.configs.base import load_experiment
from samba_jax.data import tokenizer as tokenizer_lib
from samba_jax.train_loop import train_and_evaluate
from tests.conftest import TINY_VOCAB

ROOT = os.path.join(os.path.dirname(__file__), "..")
TINY_OVERRIDES = {  # the tiny experiment, shrunk further so each run compiles and trains in seconds
    "model.vocab_size": TINY_VOCAB, "model.d_model": 32, "model.num_repeats": 1, "model.num_heads": 2,
    "model.num_kv_heads": 1, "model.head_dim": 16, "model.window": 16, "model.mlp_hidden": 64,
    "model.scan_chunk": 8, "data.seq_len": 32, "batch_size": 4, "micro_batch_size": 2,
    "log_every_steps": 1, "eval_every_steps": 6, "eval_steps": 2, "checkpoint_every_steps": 6,
    "optimizer.learning_rate": 1e-2,
}


def tiny_config(tokenizer_path, steps):
    c = load_experiment(os.path.join(ROOT, "experiments", "tiny.py"))
    for key, value in {**TINY_OVERRIDES, "num_train_steps": steps, "data.tokenizer": tokenizer_path}.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer_path(tiny_tokenizer_workdir):
    return tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB)


@pytest.fixture(scope="module")
def uninterrupted_run(tokenizer_path, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    train_and_evaluate(tiny_config(tokenizer_path, 12), workdir)
    return workdir, read_metrics(workdir)


def test_validation_loss_falls_and_records_are_written(uninterrupted_run):
    workdir, records = uninterrupted_run
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert sorted(evals) == [0, 6, 12]
    assert evals[12] < evals[6] < evals[0] - 0.3
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert {"lr", "grad_norm", "tokens_per_sec", "step_time", "eta_seconds"} <= set(train[0])
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]


def test_stop_and_resume_gives_the_losses_of_an_uninterrupted_run(uninterrupted_run, tokenizer_path, tmp_path):
    _, expected = uninterrupted_run
    workdir = str(tmp_path)
    train_and_evaluate(tiny_config(tokenizer_path, 12), workdir, stop_after_steps=5)  # saves step 5
    assert "5" in os.listdir(os.path.join(workdir, "checkpoints"))
    train_and_evaluate(tiny_config(tokenizer_path, 12), workdir)  # resumes at 5: same params AND data
    got = read_metrics(workdir)
    key = lambda records, field: [(r["step"], r[field]) for r in records if field in r]  # noqa: E731
    assert key(got, "loss") == key(expected, "loss")  # bitwise on CPU
    assert key(got, "eval_loss") == key(expected, "eval_loss")

    # A rerun with a different config keeps the first config.json and records the new one beside it.
    train_and_evaluate(tiny_config(tokenizer_path, 13), workdir)
    assert os.path.exists(os.path.join(workdir, "config.resumed_at_step_12.json"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_train_steps"] == 12


def test_tokenizer_vocab_mismatch_is_named_before_compiling(tokenizer_path, tmp_path):
    c = tiny_config(tokenizer_path, 2)
    c.model.vocab_size = TINY_VOCAB + 1
    with pytest.raises(ValueError, match=rf"config.model.vocab_size={TINY_VOCAB + 1} .*vocab_size={TINY_VOCAB}"):
        train_and_evaluate(c, str(tmp_path))


def test_missing_tokenizer_file_is_named(tmp_path):
    c = tiny_config(str(tmp_path / "nope.model"), 2)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        train_and_evaluate(c, str(tmp_path / "run"))


def test_cli_saves_on_sigterm_and_exits_143(tokenizer_path, tmp_path):
    workdir = str(tmp_path / "run")
    overrides = [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, "num_train_steps": 100_000,
                                                   "checkpoint_every_steps": 1000}.items()]
    cmd = [sys.executable, "-m", "samba_jax.train", f"--config={ROOT}/experiments/tiny.py", f"--workdir={workdir}",
           f"--config.data.tokenizer={tokenizer_path}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path) and any('"loss"' in line for line in open(metrics_path)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    last_step = max(r["step"] for r in read_metrics(workdir))
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert saved and max(saved) >= last_step  # the step in flight when the signal came is saved too
    assert "rerun the same command to resume" in output


def test_resuming_with_a_different_model_names_the_fix(uninterrupted_run, tokenizer_path, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(uninterrupted_run[0], workdir)
    c = tiny_config(tokenizer_path, 20)
    c.model.d_model, c.model.num_heads = 64, 4
    with pytest.raises(ValueError, match="does not fit this config's model.*new --workdir"):
        train_and_evaluate(c, workdir)
