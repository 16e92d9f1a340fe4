"""Checkpoint faults: damaged files fall back to the previous step (or stop), killed saves leave no checkpoint."""

import glob
import os
import random
import shutil
import signal
import subprocess
import time
import warnings

import pytest

from samba_jax.checkpoint import DamagedCheckpointError
from samba_jax.data import tokenizer as tokenizer_lib
from samba_jax.train_loop import train_and_evaluate
from tests.conftest import TINY_VOCAB
from tests.test_train_loop import ROOT, cli, losses_by_step, read_metrics, reference_losses, tiny_config


@pytest.fixture(scope="module")
def tokenizer_path(tiny_tokenizer_workdir):
    return tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB)


def truncate_largest_array_file(step_dir):
    """Halves the biggest tensorstore data file of a saved state; returns its path."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    victim = max(files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    return victim


def test_damaged_newest_checkpoint_warns_and_resumes_from_the_previous_one(tokenizer_path, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(tokenizer_path, 8)
    config.checkpoint_every_steps, config.eval_every_steps = 4, 100
    train_and_evaluate(config, workdir)
    expected = losses_by_step(read_metrics(workdir))
    truncate_largest_array_file(os.path.join(workdir, "checkpoints", "8"))
    strict = str(tmp_path / "strict")
    shutil.copytree(workdir, strict)

    # checkpoint_fail_on_damage: stop, naming the checkpoint and the reading error.
    config.checkpoint_fail_on_damage = True
    with pytest.raises(DamagedCheckpointError, match=r"checkpoints/8 \(step 8\) is damaged .*Fix: move"):
        train_and_evaluate(config, strict)

    # Default: warn, set step 8 aside, resume from 4; steps 5..8 give the same losses again.
    config.checkpoint_fail_on_damage = False
    with pytest.warns(UserWarning, match=r"checkpoints/8 \(step 8\) is damaged and cannot be restored: .*Moved"):
        train_and_evaluate(config, workdir)
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9)) + list(range(5, 9))
    assert losses_by_step(records) == expected  # also asserts the repeated steps logged identical losses
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]  # step 8 saved afresh
    assert [d.split(".")[0] for d in os.listdir(os.path.join(workdir, "checkpoints_damaged"))] == ["8"]


def test_kill_9_mid_save_leaves_no_checkpoint_restore_would_pick(tokenizer_path, tmp_path):
    workdir, total = str(tmp_path / "run"), 2000
    proc = subprocess.Popen(cli(workdir, tokenizer_path, num_train_steps=total, checkpoint_every_steps=1,
                                log_every_steps=1000), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt_dir) and any(s.isdigit() for s in os.listdir(ckpt_dir)):
            break
        time.sleep(0.05)
    assert proc.poll() is None
    time.sleep(random.uniform(0.0, 0.3))  # a save every step: the kill usually lands inside one
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    complete = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
    # Plus a half-written save by hand, as a kill inside orbax's write leaves it: not a step.
    partial = os.path.join(ckpt_dir, f"{complete[-1] + 1}.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(ckpt_dir, str(complete[-1])), partial)
    truncate_largest_array_file(partial)

    config = tiny_config(tokenizer_path, total)
    config.checkpoint_every_steps = 1000
    with warnings.catch_warnings(record=True) as caught:  # "damaged" would mean a half-written save was picked
        warnings.simplefilter("always")
        train_and_evaluate(config, workdir, stop_after_steps=3)
    assert not [w for w in caught if "damaged" in str(w.message)]
    assert not glob.glob(os.path.join(ckpt_dir, "*orbax-checkpoint-tmp*"))  # cleaned on start-up
    got = losses_by_step(read_metrics(workdir))
    assert sorted(got) == list(range(complete[-1] + 1, complete[-1] + 4))  # resumed after the last complete step
    assert got.items() <= reference_losses(tokenizer_path, str(tmp_path / "ref"), total, complete[-1] + 3).items()


def test_cli_truncated_checkpoint_resumes_from_previous_or_exits_4(tokenizer_path, tmp_path):
    workdir = str(tmp_path / "run")
    cmd = cli(workdir, tokenizer_path, num_train_steps=8, checkpoint_every_steps=4, eval_every_steps=100)
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = losses_by_step(read_metrics(workdir))
    truncate_largest_array_file(os.path.join(workdir, "checkpoints", "8"))
    strict = str(tmp_path / "strict")
    shutil.copytree(workdir, strict)

    failed = subprocess.run(cli(strict, tokenizer_path, num_train_steps=8, checkpoint_every_steps=4,
                                eval_every_steps=100, checkpoint_fail_on_damage=True),
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert failed.returncode == 4, failed.stderr[-3000:]
    assert "checkpoints/8 (step 8) is damaged" in failed.stderr

    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoints/8 (step 8) is damaged" in resumed.stderr and "checkpoints_damaged/8" in resumed.stderr
    assert losses_by_step(read_metrics(workdir)) == expected  # steps 5..8 rerun with identical losses
