"""Generation (samba_jax/generate.py): decoding step by step equals the parallel forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from samba_jax import generate
from samba_jax.config import ModelConfig
from samba_jax.configs.base import load_experiment
from samba_jax.model.samba import SambaLM
from samba_jax.trainer import init_state, make_optimizer


def model(pattern="mamba,mlp,swa,mlp", window=6, vocab=97):
    c = load_experiment("experiments/tiny.py")
    c.model.update(vocab_size=vocab, d_model=32, num_repeats=2, pattern=pattern, num_heads=4, num_kv_heads=2,
                   head_dim=8, window=window, mlp_hidden=64, compute_dtype="float32")
    cfg = ModelConfig.from_config(c.model)
    tx, _ = make_optimizer(c.optimizer, 10)
    params = init_state(cfg, tx, jax.random.key(0))["params"]
    # Random init has D=1 and tiny projections; perturb so every path carries signal.
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    return cfg, params


@pytest.mark.parametrize("pattern", ["mamba,mlp,swa,mlp", "attn,mlp", "mamba"])
@pytest.mark.parametrize("prompt_len", [1, 3, 9])
def test_decoding_equals_the_parallel_forward_far_past_the_window(pattern, prompt_len):
    cfg, params = model(pattern)
    seq = 24  # 4x the window
    tokens = jax.random.randint(jax.random.key(1), (2, seq), 0, cfg.vocab_size)
    want = SambaLM(cfg).apply({"params": params}, tokens)  # (2, seq, vocab)
    logits, state = generate.prefill(cfg, params, tokens[:, :prompt_len], max_len=seq)
    np.testing.assert_allclose(logits, want[:, prompt_len - 1], rtol=1e-4, atol=1e-4)
    step = jax.jit(lambda s, t: generate.decode_step(cfg, params, s, t))
    for t in range(prompt_len, seq):
        logits, state = step(state, tokens[:, t])
        np.testing.assert_allclose(logits, want[:, t], rtol=1e-4, atol=1e-4, err_msg=f"position {t}")


def test_decoding_with_the_pallas_attention_step_equals_the_parallel_forward():
    # The GPU default (flash decoding, pallas_kernels/sliding_window_attention/decode.py), here in
    # interpret mode, inside the real decode step across the window boundary.
    cfg, params = model()
    cfg = dataclasses.replace(cfg, decode_attention_implementation="pallas")
    seq, prompt_len = 12, 3
    tokens = jax.random.randint(jax.random.key(2), (2, seq), 0, cfg.vocab_size)
    want = SambaLM(cfg).apply({"params": params}, tokens)
    _, state = generate.prefill(cfg, params, tokens[:, :prompt_len], max_len=seq)
    step = jax.jit(lambda s, t: generate.decode_step(cfg, params, s, t))
    for t in range(prompt_len, seq):
        logits, state = step(state, tokens[:, t])
        np.testing.assert_allclose(logits, want[:, t], rtol=1e-4, atol=1e-4, err_msg=f"position {t}")


def test_decoding_state_does_not_grow_with_length():
    cfg, params = model()
    tokens = jnp.zeros((1, 40), jnp.int32)
    sizes = []
    for length in (8, 40):
        _, state = generate.prefill(cfg, params, tokens[:, :length], max_len=10_000)
        sizes.append(sum(x.size for x in jax.tree.leaves(state["layers"])))
    assert sizes[0] == sizes[1]


def test_prompts_of_different_lengths_continue_as_if_alone():
    cfg, params = model()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, cfg.vocab_size, 3)), list(rng.integers(0, cfg.vocab_size, 11))]
    together = generate.generate(cfg, params, prompts, max_new_tokens=8)
    alone = [generate.generate(cfg, params, [p], max_new_tokens=8)[0] for p in prompts]
    assert together == alone
    # Greedy continuation equals the argmax of the parallel forward over prompt + continuation.
    full = jnp.asarray([prompts[1] + together[1]])
    logits = SambaLM(cfg).apply({"params": params}, full)
    assert together[1] == [int(x) for x in jnp.argmax(logits[0, len(prompts[1]) - 1:-1], -1)]


def test_stop_tokens_streaming_and_sampling():
    cfg, params = model()
    greedy = generate.generate(cfg, params, [[5, 6, 7]], max_new_tokens=6)[0]
    stopped = generate.generate(cfg, params, [[5, 6, 7]], max_new_tokens=6, stop_tokens=[greedy[2]])[0]
    assert stopped == greedy[:greedy.index(greedy[2]) + 1]
    seen = []
    generate.generate(cfg, params, [[5], [6, 7]], max_new_tokens=4, on_token=lambda r, t: seen.append((r, t)))
    assert sorted(r for r, _ in seen) == [0] * 4 + [1] * 4
    a = generate.generate(cfg, params, [[5, 6]], 12, temperature=1.0, seed=1)
    b = generate.generate(cfg, params, [[5, 6]], 12, temperature=1.0, seed=2)
    assert a != b and a == generate.generate(cfg, params, [[5, 6]], 12, temperature=1.0, seed=1)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 300)
    draw = lambda **kw: {int(generate.sample(logits, k, 1.0, **kw)[0]) for k in keys}  # noqa: E731
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert draw(top_p=0.5) == {0}
    assert draw() == {0, 1, 2, 3}
    assert int(generate.sample(logits, keys[0])[0]) == 0


def test_empty_prompt_is_refused():
    cfg, params = model()
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(cfg, params, [[1], []], 3)


def test_cli_continues_a_prompt_from_a_training_workdir(tmp_path, tiny_tokenizer_workdir):
    import os
    import subprocess
    import sys

    from samba_jax.data import tokenizer as tokenizer_lib
    from samba_jax.train_loop import train_and_evaluate
    from tests.conftest import TINY_VOCAB
    from tests.test_train_loop import ROOT, tiny_config

    workdir = str(tmp_path / "run")
    tokenizer = tokenizer_lib.default_tokenizer_path(str(tiny_tokenizer_workdir), TINY_VOCAB)
    train_and_evaluate(tiny_config(tokenizer, 6), workdir)
    cmd = [sys.executable, "-m", "samba_jax.generate", f"--checkpoint={workdir}", "--prompt=def main(",
           "--max_new_tokens=12", "--stop_at_eos=false"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("def main(") and len(out.stdout) > len("def main(\n")
    assert "step 6" in out.stderr
    missing = subprocess.run(cmd[:3] + [f"--checkpoint={tmp_path}/nothing"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 2 and "holds no config.json" in missing.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))


@pytest.mark.parametrize("pattern", ["mamba,mlp,swa,mlp", "attn,mlp"])
@pytest.mark.parametrize("chunk", [4, 7])  # single tokens: the decode-step tests
def test_chunked_prefill_equals_one_shot(pattern, chunk):
    cfg, params = model(pattern)  # window 6
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, cfg.vocab_size)
    want_logits, want_state = generate.prefill(cfg, params, tokens, max_len=30)
    logits, state = generate.prefill_chunks(cfg, params, tokens, max_len=30, chunk=chunk)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # And decoding goes on identically.
    next_logits, _ = generate.decode_step(cfg, params, state, tokens[:, 0])
    want_next, _ = generate.decode_step(cfg, params, want_state, tokens[:, 0])
    np.testing.assert_allclose(next_logits, want_next, rtol=1e-4, atol=1e-4)


def test_generate_with_small_prefill_chunks_matches_one_piece():
    cfg, params = model()
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9]]
    assert (generate.generate(cfg, params, prompts, 6, prefill_chunk=4)
            == generate.generate(cfg, params, prompts, 6, prefill_chunk=0))


def test_decode_params_cast_only_matmul_weights_and_keep_the_step_identical():
    cfg, params = model()
    cfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
    prepared = generate.decode_params(cfg, params)
    assert isinstance(prepared["blocks"], tuple) and len(prepared["blocks"]) == cfg.num_repeats
    for path, leaf in jax.tree_util.tree_flatten_with_path(prepared)[0]:
        name = jax.tree_util.keystr(path)
        kernel = name.endswith("['kernel']") or name == "['tied_head']"
        assert leaf.dtype == (jnp.bfloat16 if kernel else jnp.float32), name
    assert prepared["embed"]["embedding"].dtype == jnp.float32  # the lookup stays float32
    assert generate.decode_params(cfg, prepared) is prepared  # prepared once
    _, state = generate.prefill(cfg, params, jnp.array([[5, 7, 11]]), max_len=16)
    token = jnp.array([3])
    raw, _ = generate.decode_step(cfg, params, state, token)
    fast, _ = generate.decode_step(cfg, prepared, state, token)
    np.testing.assert_array_equal(raw, fast)  # the same bf16 matmuls, cast once instead of per step
