"""The summary CLI: the parameter table comes from the initialiser and matches the reference."""

import os
import subprocess
import sys

from samba_jax.summary import summary_text
from tests.model.test_samba import load_experiment

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_summary_of_samba_421m_lists_modules_total_and_flops():
    text = summary_text(load_experiment("samba_421m"))
    assert "421,793,280" in text
    assert "blocks/mamba_0/in_proj" in text and "embed" in text
    assert "training" in text and "GFLOP" in text and "T*W-W^2/2" in text


def test_summary_cli_runs_without_allocating_weights():
    out = subprocess.run([sys.executable, "-m", "samba_jax.summary", f"--config={ROOT}/experiments/samba_1b.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1,330,207,488" in out.stdout
