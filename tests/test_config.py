"""Config validation (named errors before compile), variants, and the FLOP convention."""

import pytest

from samba_jax.config import ConfigError, ModelConfig, flops_per_token, validate_run
from samba_jax.configs.base import base_config, parse_arg
from tests.model.test_samba import load_experiment

BASE = dict(vocab_size=100, d_model=64, num_repeats=1, num_heads=4, num_kv_heads=4, head_dim=16,
            window=8, mlp_hidden=128, compute_dtype="float32")


@pytest.mark.parametrize("override,field", [
    (dict(num_kv_heads=3), "model.num_kv_heads"),
    (dict(head_dim=10), "model.head_dim"),
    (dict(head_dim=15, num_heads=4), "model.head_dim"),
    (dict(window=0), "model.window"),
    (dict(pattern="mamba,conv"), "model.pattern"),
    (dict(pattern=""), "model.pattern"),
    (dict(d_model=0), "model.d_model"),
    (dict(remat="sometimes"), "model.remat"),
    (dict(decode_attention_implementation="flash"), "model.decode_attention_implementation"),
    (dict(compute_dtype="float8"), "model.compute_dtype"),
    (dict(bogus=1), "model.bogus"),
])
def test_bad_model_fields_name_the_field_and_the_fix(override, field):
    with pytest.raises(ConfigError, match=rf"config\.{field}: .*Fix: "):
        ModelConfig.from_config({**BASE, **override})


def test_run_validation_catches_window_longer_than_sequence_and_bad_batches():
    c = base_config()
    c.model.update(BASE)
    cfg = ModelConfig.from_config(c.model)
    c.data.seq_len = 4
    with pytest.raises(ConfigError, match=r"config\.model\.window: 8 is longer than data\.seq_len=4"):
        validate_run(c, cfg)
    c.data.seq_len = 64
    c.batch_size, c.micro_batch_size = 10, 4
    with pytest.raises(ConfigError, match=r"config\.micro_batch_size: 4 does not divide batch_size=10"):
        validate_run(c, cfg)
    c.micro_batch_size = 5
    validate_run(c, cfg)


def test_pattern_string_and_auto_dtype():
    cfg = ModelConfig.from_config({**BASE, "pattern": " mamba, mlp ,swa,mlp", "compute_dtype": "auto"})
    assert cfg.pattern == ("mamba", "mlp", "swa", "mlp")
    assert cfg.compute_dtype == "float32"  # tests run on CPU
    assert cfg.resolved_dt_rank == 4 and cfg.d_inner == 128 and cfg.num_layers == 4


def test_parse_arg_variants():
    arg = parse_arg("seq_len=1024,runlocal", seq_len=4096, runlocal=False)
    assert arg.seq_len == 1024 and arg.runlocal is True
    with pytest.raises(ValueError, match="Unknown experiment variant 'seqlen'"):
        parse_arg("seqlen=3", seq_len=4096)


def test_seq_len_variant_keeps_two_million_tokens_per_step():
    c = load_experiment("samba_1b", "seq_len=8192")
    assert c.data.seq_len == 8192 and c.batch_size * c.data.seq_len == 2**21


def test_flops_follow_maxtext_conventions():
    # One MLP sublayer: 2 FLOPs per MAC, three d x hidden matrices; plus the tied logits.
    mlp = ModelConfig.from_config({**BASE, "pattern": "mlp"})
    assert flops_per_token(mlp, 32)["forward"] == 2 * 3 * 64 * 128 + 2 * 100 * 64
    # Attention: causal full = 4 T^2/2 H Dh per sequence; window counted as T*W - W^2/2.
    full = ModelConfig.from_config({**BASE, "pattern": "attn"})
    swa = ModelConfig.from_config({**BASE, "pattern": "swa"})
    proj = 2 * 64 * 16 * (2 * 4 + 2 * 4) + 2 * 100 * 64
    t, w, hd = 32, 8, 64
    assert flops_per_token(full, t)["forward"] == pytest.approx(proj + 4 * t * t / 2 * hd / t)
    assert flops_per_token(swa, t)["forward"] == pytest.approx(proj + 4 * (t * w - w * w / 2) * hd / t)
    assert flops_per_token(swa, t)["train"] == pytest.approx(3 * flops_per_token(swa, t)["forward"])


def test_reference_token_budgets_and_runlocal_variant():
    c421 = load_experiment("samba_421m")
    assert (c421.batch_size, c421.data.seq_len, c421.num_train_steps) == (512, 4096, 9537)  # 20B tokens
    assert load_experiment("samba_1b").num_train_steps == 47684  # 100B tokens
    local = load_experiment("samba_1b", "runlocal")
    assert (local.batch_size, local.num_train_steps) == (2, 4) and local.model.d_model == 2304


def _valid_run_config():
    c = base_config()
    c.model.update(BASE)
    c.data.seq_len, c.batch_size, c.micro_batch_size = 64, 8, 4
    return c


# Each bad config (dotted field -> value) and the start of its message; all are caught before compiling.
BAD_RUN_CONFIGS = [
    ({"model.num_heads": 3, "model.head_dim": 16}, r"config\.model\.num_kv_heads: 4 does not divide num_heads=3"),
    ({"model.head_dim": 32}, r"config\.model\.head_dim: num_heads\*head_dim = 128 differs from d_model=64"),
    ({"model.window": 0}, r"config\.model\.window: must be >= 1"),
    ({"model.window": 128}, r"config\.model\.window: 128 is longer than data\.seq_len=64"),
    ({"data.seq_len": 0}, r"config\.data\.seq_len: must be positive, got 0"),
    ({"batch_size": 10}, r"config\.micro_batch_size: 4 does not divide batch_size=10"),
    ({"micro_batch_size": 0}, r"config\.batch_size: batch sizes must be positive"),
    ({"num_train_steps": 0}, r"config\.num_train_steps: must be positive"),
    ({"log_every_steps": 0}, r"config\.log_every_steps: must be positive, got 0"),
    ({"eval_every_steps": -1}, r"config\.eval_every_steps: must be positive, got -1"),
    ({"checkpoint_every_steps": 0}, r"config\.checkpoint_every_steps: must be positive, got 0"),
    ({"keep_checkpoints": 0}, r"config\.keep_checkpoints: must be positive, got 0"),
    ({"eval_steps": -2}, r"config\.eval_steps: must be >= 0, got -2"),
    ({"optimizer.learning_rate": -1e-3}, r"config\.optimizer\.learning_rate: must be >= 0, got -0\.001"),
    ({"optimizer.learning_rate": float("nan")}, r"config\.optimizer\.learning_rate: must be >= 0, got nan"),
    ({"optimizer.warmup_fraction": 1.0}, r"config\.optimizer\.warmup_fraction: must be in \[0, 1\)"),
    ({"max_consecutive_bad_steps": -1}, r"config\.max_consecutive_bad_steps: must be >= 0, got -1"),
    ({"data.tokenizer": "/nonexistent/sp.model"},
     r"config\.data\.tokenizer: file '/nonexistent/sp\.model' does not exist"),
]


@pytest.mark.parametrize("overrides,message", BAD_RUN_CONFIGS, ids=[next(iter(o)) for o, _ in BAD_RUN_CONFIGS])
def test_bad_run_configs_name_the_field_and_the_fix(overrides, message):
    c = _valid_run_config()
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises(ConfigError, match=message + r".*Fix: "):
        validate_run(c, ModelConfig.from_config(c.model))


def test_micro_batch_must_split_over_processes_and_missing_files_are_file_errors():
    c = _valid_run_config()
    cfg = ModelConfig.from_config(c.model)
    validate_run(c, cfg, process_count=4)
    with pytest.raises(ConfigError, match=r"config\.micro_batch_size: 4 is not divisible by the process count 3"):
        validate_run(c, cfg, process_count=3)
    c.data.tokenizer = "/nonexistent/sp.model"
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, for callers that catch those
        validate_run(c, cfg)
