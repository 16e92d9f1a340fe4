"""A missing experiment file, a bad variant or a misspelt override: one line naming it, exit 2."""

import os
import subprocess
import sys

import pytest

from samba_jax.configs.command_line import config_flag_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "experiments", "tiny.py")


@pytest.mark.parametrize("args,expected", [
    (["--config=experiments/no_such.py"], "the file 'experiments/no_such.py' does not exist"),
    ([f"--config={TINY}:stepz=3"], "Unknown experiment variant 'stepz'"),
    ([f"--config={TINY}", "--config.modle.d_model=3"], "config has no field 'modle'; did you mean --config.model?"),
    ([f"--config={TINY}", "--config.model.d_modle", "3"], "did you mean --config.model.d_model?"),
    (["--config", TINY, "--noconfig.model.tie_embedding"], "did you mean --config.model.tie_embeddings?"),
    ([f"--config={TINY}", "--config.model.d_model.x=1"], "config.model.d_model is a value"),
    ([f"--config={TINY}", "--config.model.zzzz=1"], "its fields are "),
    (["--config="], "--config is empty"),
])
def test_bad_config_flags_are_named(args, expected):
    error = config_flag_error(["train", *args])
    assert error is not None and expected in error, error


def test_good_flags_and_other_flags_pass():
    assert config_flag_error(["train", f"--config={TINY}:steps=3", "--config.model.d_model=64",
                              "--noconfig.model.tie_embeddings", "--workdir=/tmp/x", "--", "--config.nope=1"]) is None
    assert config_flag_error(["train", "--workdir=/tmp/x"]) is None  # absl names a missing required flag


@pytest.mark.parametrize("module", ["samba_jax.train", "samba_jax.summary"])
def test_the_clis_print_one_line_and_exit_2(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, f"--config={TINY}", "--config.model.windw=3",
                          f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "ERROR (ConfigError): --config.model.windw: config.model has no field 'windw'; did you mean "
        "--config.model.window?"], out.stderr
    assert not os.listdir(tmp_path)  # nothing written
