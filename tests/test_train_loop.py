"""End-to-end runs of the loop: loss falls, resume is exact, signals and preemption save, faults stop cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax.config import ConfigError
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


def cli(workdir, tokenizer_path, **overrides):
    """The training command line for the tiny config (for subprocess tests)."""
    values = {**TINY_OVERRIDES, "data.tokenizer": tokenizer_path, **overrides}
    return [sys.executable, "-m", "samba_jax.train", f"--config={ROOT}/experiments/tiny.py", f"--workdir={workdir}",
            *[f"--config.{k}={v}" for k, v in values.items()]]


def start_and_wait_for_a_step(cmd, workdir):
    """Starts `cmd`; returns the process once it has logged a training step."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path) and any('"loss"' in line for line in open(metrics_path)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    return proc


def losses_by_step(records):
    """{step: loss}; a step logged twice (around a signal) must have logged the same value."""
    out = {}
    for r in records:
        if "loss" in r:
            assert out.setdefault(r["step"], r["loss"]) == r["loss"], r
    return out


def reference_losses(tokenizer_path, workdir, num_train_steps, steps):
    """Losses of steps 1..steps of an uninterrupted in-process run of `num_train_steps` (schedule length)."""
    train_and_evaluate(tiny_config(tokenizer_path, num_train_steps), workdir, stop_after_steps=steps)
    return losses_by_step(read_metrics(workdir))


def test_cli_sigterm_saves_exits_143_and_resumes_with_identical_losses(tokenizer_path, tmp_path):
    workdir, total = str(tmp_path / "run"), 2000  # long enough that the signal lands mid-run
    cmd = cli(workdir, tokenizer_path, num_train_steps=total, checkpoint_every_steps=1000)
    proc = start_and_wait_for_a_step(cmd, workdir)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    last_step = max(r["step"] for r in read_metrics(workdir))
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    assert saved and max(saved) >= last_step  # the step in flight when the signal came is saved too
    assert "rerun the same command to resume" in output

    resumed = subprocess.run(cmd + ["--stop_after_steps=3"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = losses_by_step(read_metrics(workdir))
    assert sorted(got) == list(range(1, max(saved) + 4))  # every step once, 3 past the signal
    assert got == reference_losses(tokenizer_path, str(tmp_path / "reference"), total, max(saved) + 3)


def test_nonfinite_steps_are_skipped_and_a_run_of_them_stops_training(tokenizer_path, tmp_path, monkeypatch):
    from samba_jax import train_loop, trainer

    bad_steps = {2, 5, 6, 7}  # a lone bad step, then a run of 3 (= the limit) followed by good steps

    def poisoned_train_step(model, tx, schedule, **kwargs):
        def loss_fn(params, tokens):  # NaN loss and gradients for batches with a negative token
            total, count = trainer.next_token_loss(model, params, jnp.maximum(tokens, 0))
            return total * jnp.where(jnp.any(tokens < 0), jnp.nan, 1.0), count

        step_fn = trainer.make_train_step(model, tx, schedule, loss_fn=loss_fn, **kwargs)
        calls = iter(range(1, 10**6))

        def run(state, tokens):
            return step_fn(state, np.negative(tokens) - 1 if next(calls) in bad_steps else tokens)

        return run

    monkeypatch.setattr(train_loop, "make_train_step", poisoned_train_step)
    c = tiny_config(tokenizer_path, 20)
    c.log_every_steps, c.checkpoint_every_steps, c.max_consecutive_bad_steps = 4, 3, 3
    with pytest.raises(trainer.NonFiniteError, match=r"Steps 5\.\.7: 3 consecutive .* stopped at step 8\. "
                       r"The last good checkpoint is .*checkpoints/6 \(step 6\)"):
        train_and_evaluate(c, str(tmp_path))
    records = {r["step"]: r for r in read_metrics(str(tmp_path)) if "loss" in r}
    assert sorted(records) == [4]  # the abort comes at the log point of step 8, before writing it
    assert records[4]["skipped_steps"] == 1 and records[4]["skipped"] == 0

    # Skipping alone (limit 0): the run finishes, the bad steps are logged as skipped.
    c.log_every_steps, c.max_consecutive_bad_steps, c.num_train_steps = 1, 0, 9
    train_and_evaluate(c, str(tmp_path / "skip_only"))
    records = {r["step"]: r for r in read_metrics(str(tmp_path / "skip_only")) if "loss" in r}
    assert [s for s, r in records.items() if r["skipped"]] == sorted(bad_steps)
    assert records[9]["skipped_steps"] == 4 and np.isfinite(records[9]["loss"])


def test_resuming_with_a_different_model_names_the_fix(uninterrupted_run, tokenizer_path, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(uninterrupted_run[0], workdir)
    c = tiny_config(tokenizer_path, 20)
    c.model.d_model, c.model.num_heads = 64, 4
    with pytest.raises(ValueError, match="does not fit this config's model.*new --workdir"):
        train_and_evaluate(c, workdir)


def test_data_source_matching_nothing_is_named_before_compiling(tokenizer_path, tmp_path, monkeypatch):
    from samba_jax import train_loop

    monkeypatch.setattr(train_loop, "init_state_on_mesh", lambda *a: pytest.fail("reached model init"))
    c = tiny_config(tokenizer_path, 2)
    c.data.source = f"text:{tmp_path}/nothing_here/*.txt"
    with pytest.raises((ValueError, FileNotFoundError), match="nothing_here"):
        train_and_evaluate(c, str(tmp_path / "run"))


def test_cli_config_error_exits_2_with_the_message_and_no_traceback(tokenizer_path, tmp_path):
    cmd = cli(str(tmp_path / "run"), tokenizer_path, max_consecutive_bad_steps=-1)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config.max_consecutive_bad_steps: must be >= 0" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("error,code", [("NonFiniteError", 3), ("DamagedCheckpointError", 4), ("ConfigError", 2)])
def test_cli_exit_codes_tell_schedulers_not_to_retry(error, code, monkeypatch, capsys):
    import types

    from samba_jax import checkpoint, config, train, trainer

    kind = {"NonFiniteError": trainer, "DamagedCheckpointError": checkpoint, "ConfigError": config}[error]

    def failing(*args):
        raise getattr(kind, error)("the reason")

    # Stand-ins for every flag main reads, so the test does not depend on absl having parsed flags.
    for name, value in (("_CONFIG", None), ("_WORKDIR", None), ("_STOP_AFTER", 0), ("_COORDINATOR", ""),
                        ("_NUM_PROCESSES", 0), ("_PROCESS_ID", -1)):
        monkeypatch.setattr(train, name, types.SimpleNamespace(value=value))
    monkeypatch.setattr(train, "train_and_evaluate", failing)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["train"])
    assert exit_info.value.code == code
    assert f"ERROR ({error}): the reason" in capsys.readouterr().err


def test_preemption_notice_saves_and_exits_like_sigterm(tokenizer_path, tmp_path, monkeypatch):
    from samba_jax import checkpoint

    original = checkpoint.make_manager

    def make_manager(*args, **kwargs):  # multi-host JAX would agree on step 3 after a host's SIGTERM
        manager = original(*args, **kwargs)
        monkeypatch.setattr(manager, "reached_preemption", lambda step: step == 3)
        return manager

    monkeypatch.setattr(checkpoint, "make_manager", make_manager)
    with pytest.raises(SystemExit) as exit_info:
        train_and_evaluate(tiny_config(tokenizer_path, 12), str(tmp_path))
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["3"]
    assert max(r["step"] for r in read_metrics(str(tmp_path))) == 3


def test_cli_diverging_run_skips_nonfinite_steps_then_exits_3(tokenizer_path, tmp_path):
    # A learning rate of 1e30 makes the weights overflow after the first real update: every later
    # step has a non-finite loss, is skipped, and the third in a row stops the run.
    workdir = str(tmp_path / "run")
    cmd = cli(workdir, tokenizer_path, num_train_steps=50, max_consecutive_bad_steps=3,
              **{"optimizer.learning_rate": 1e30, "optimizer.warmup_fraction": 0.0})
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 3, run.stderr[-3000:]
    assert "ERROR (NonFiniteError)" in run.stderr and "3 consecutive" in run.stderr
    records = [r for r in read_metrics(workdir) if "loss" in r]
    assert records[0]["skipped"] == 0 and any(r["skipped"] for r in records)


def test_a_file_source_validates_on_held_out_documents_and_at_eval_lengths(tokenizer_path, tmp_path):
    from samba_jax.data import default_corpus

    path = tmp_path / "docs.jsonl"
    with open(path, "w") as f:
        for text in default_corpus.load_documents("validation")[:60]:
            f.write(json.dumps({"text": text}) + "\n")
    c = tiny_config(tokenizer_path, 2)
    c.data.source = f"jsonl:{path}"
    c.eval_lengths = "16,64"
    last = train_and_evaluate(c, str(tmp_path / "run"))
    assert {"eval_loss", "eval_loss@16", "eval_loss@64"} <= set(last), last
    records = read_metrics(str(tmp_path / "run"))
    assert any("eval_loss@64" in r for r in records if r.get("step") == 0)
    c.eval_lengths = "16,x"
    with pytest.raises(ConfigError, match="eval_lengths"):
        train_and_evaluate(c, str(tmp_path / "run2"))
