"""The perplexity task (samba_jax/evaluate/perplexity.py, loading.py, the CLI)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from samba_jax.config import ConfigError
from samba_jax.data import pipeline
from samba_jax.evaluate import loading, perplexity
from samba_jax.model.samba import SambaLM, init_params
from samba_jax.train_loop import evaluate
from samba_jax.trainer import make_eval_step
from tests.evaluate.test_streaming import full_forward_nll, model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_summary_buckets_and_cumulative_perplexity():
    nll = np.tile(np.arange(200, dtype=np.float32) / 100, (3, 1))  # position t has loss t / 100
    s = perplexity.summarize(nll)
    assert s["edges"] == [64, 128, 200]
    assert [(b["from"], b["to"]) for b in s["buckets"]] == [(0, 64), (64, 128), (128, 200)]
    assert s["buckets"][1]["mean_nll"] == pytest.approx(np.arange(64, 128).mean() / 100)
    assert s["cumulative_perplexity"]["128"] == pytest.approx(math.exp(np.arange(128).mean() / 100))
    assert perplexity.bucket_edges(20000) == [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 20000]


def test_stride_equals_the_full_forward_when_every_window_holds_the_attention_window():
    """SWA-only, two layers of window 8 see 14 tokens back; windows of 24 advancing by 8 leave each
    scored token >= 16 earlier tokens, so the result is exact (rotary scores are relative)."""
    cfg, params = model("swa,mlp")
    rows = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 46))
    got, timing = perplexity.stride(cfg, params, rows, window=24, step=8)
    np.testing.assert_allclose(got, full_forward_nll(cfg, params, rows), rtol=1e-5, atol=2e-5)
    assert timing["window"] == 24
    # With Mamba layers the state before each window is lost: no longer equal past the first window.
    cfg, params = model("mamba,mlp,swa,mlp")
    got, _ = perplexity.stride(cfg, params, rows, window=24, step=8)
    assert np.abs(got - full_forward_nll(cfg, params, rows))[:, 24:].max() > 1e-4


def test_prefix_mode_equals_the_trainers_eval_loss(tiny_tokenizer):
    cfg, _ = model("mamba,mlp,swa,mlp")
    cfg = dataclasses.replace(cfg, vocab_size=tiny_tokenizer.vocab_size)
    params = init_params(cfg, jax.random.key(0))
    got = perplexity.prefix(cfg, params, "stdlib", tiny_tokenizer, [12, 24], batch=2, batches=3)

    def eval_iter(seq_len):
        return lambda: iter(pipeline.make_dataset("stdlib", tiny_tokenizer, seq_len, 2, split="validation",
                                                  shuffle=False, repeat=True, max_batches=3))

    trainer_eval = evaluate(make_eval_step(SambaLM(cfg)), params, eval_iter(24))
    assert got["24"]["mean_nll"] == pytest.approx(trainer_eval["eval_loss"], rel=1e-6)
    assert got["24"]["tokens"] == 3 * 2 * 24
    rows = np.concatenate([np.asarray(b["tokens"]) for b in eval_iter(24)()])  # L = 12: the rows' first 13
    assert got["12"]["mean_nll"] == pytest.approx(full_forward_nll(cfg, params, rows[:, :13]).mean(), rel=1e-5)


def test_long_rows_whole_documents_or_one_stream(tiny_tokenizer):
    rows, info = loading.long_rows("stdlib", "validation", tiny_tokenizer, 300, 2, concat_documents=False)
    assert rows.shape == (2, 301) and info["rows"] == 2
    stream, info = loading.long_rows("stdlib", "validation", tiny_tokenizer, 5000, 2, concat_documents=True)
    assert stream.shape == (2, 5001) and info["concat_documents"]
    eos = tiny_tokenizer.eos_id
    assert (stream == eos).sum() >= 1  # documents joined with EOS between them
    with pytest.raises(ConfigError, match="--concat_documents"):
        loading.long_rows("stdlib", "validation", tiny_tokenizer, 10**8, 1, concat_documents=False)


def test_cli_streams_a_workdir_and_never_overwrites(tmp_path, tiny_tokenizer_workdir):
    from samba_jax.data import tokenizer as tokenizer_lib
    from samba_jax.train_loop import train_and_evaluate
    from tests.conftest import TINY_VOCAB
    from tests.test_train_loop import tiny_config

    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB), 2),
                       workdir)
    out = str(tmp_path / "eval")
    cmd = [sys.executable, "-m", "samba_jax.evaluate", "perplexity", f"--checkpoint={workdir}", f"--output={out}",
           "--max_length=300", "--chunk=64", "--rows=2", "--save_tokens"]
    os.makedirs(out)
    with open(os.path.join(out, "perplexity.json"), "w") as f:
        f.write("an earlier result")
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "positions [" in done.stdout and "tokens/s" in done.stdout
    with open(os.path.join(out, "perplexity.json")) as f:
        assert f.read() == "an earlier result"  # kept; the new result took the next free name
    with open(os.path.join(out, "perplexity-2.json")) as f:
        result = json.load(f)
    assert result["mode"] == "streaming" and result["data"]["rows"] == 2
    saved = np.load(result["tokens_file"])
    assert saved["tokens"].shape == (2, 301) and saved["nll"].shape == (2, 300)
    last = str(result["summary"]["edges"][-1])
    assert result["summary"]["cumulative_perplexity"][last] == pytest.approx(math.exp(saved["nll"].mean()), rel=1e-5)
    bad = subprocess.run(cmd[:4] + [f"--output={out}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--checkpoint=PATH is required" in bad.stderr
