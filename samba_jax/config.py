"""Model configuration: the frozen `ModelConfig`, validation with named errors, FLOPs per token.

An experiment file returns an `ml_collections.ConfigDict`; `ModelConfig.from_config` turns its
`model` field into a frozen, hashable dataclass that the Flax modules read. Every check here runs
before anything is traced or compiled, and each error names the field and the fix.

The block pattern is data: `pattern="mamba,mlp,swa,mlp"` repeated `num_repeats` times is Samba;
each entry is one pre-norm residual sublayer `x += layer(norm(x))`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

# Sublayer kinds a pattern may name.
SUBLAYERS = ("mamba", "mlp", "swa", "attn")
# Peak dense bf16 FLOP/s per chip, for MFU (vendor figures, no sparsity).
PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12,
    "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12,
}


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and the fix."""


class ConfigFileError(ConfigError, FileNotFoundError):
    """A file the config names does not exist (both a ConfigError and a FileNotFoundError)."""


def _fail(field: str, problem: str, fix: str) -> None:
    raise ConfigError(f"config.{field}: {problem}. Fix: {fix}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static model hyper-parameters (hashable, safe to close over in jit)."""

    vocab_size: int
    d_model: int
    num_repeats: int
    pattern: tuple[str, ...] = ("mamba", "mlp", "swa", "mlp")
    num_heads: int = 12
    num_kv_heads: int = 12
    head_dim: int = 128
    window: int = 2048
    mlp_hidden: int = 4096
    ssm_expand: int = 2
    ssm_state: int = 16
    ssm_conv: int = 4
    dt_rank: int = 0  # 0: ceil(d_model / 16), as mamba_ssm's "auto"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    compute_dtype: str = "float32"
    scan_implementation: str = ""  # "" lets the op choose for the platform
    scan_chunk: int = 64
    scan_sequence_splits: int = 0  # 0: the op chooses (`default_sequence_splits`; only "pallas:triton" splits)
    attention_implementation: str = ""
    attention_block: int = 0  # 0: the op's default
    decode_attention_implementation: str = ""  # generation's attention step: "" (the op's choice) | xla | pallas
    remat: str = "none"  # none | block | save_dots
    loss_chunks: int = 0  # head + cross-entropy in this many groups of positions; 0: auto (model/chunked_loss.py)

    @property
    def d_inner(self) -> int:
        return self.ssm_expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)

    @property
    def num_layers(self) -> int:
        """Residual sublayers in the whole model; the output-projection init divides by its root."""
        return len(self.pattern) * self.num_repeats

    @classmethod
    def from_config(cls, model: Any) -> "ModelConfig":
        """Builds from a ConfigDict (or dict) `config.model`, validating every field."""
        values = dict(model.to_dict() if hasattr(model, "to_dict") else model)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            _fail(f"model.{unknown[0]}", "is not a model field", f"use one of {sorted(known)}")
        pattern = values.get("pattern", cls.pattern)
        if isinstance(pattern, str):
            pattern = tuple(p.strip() for p in pattern.split(",") if p.strip())
        values["pattern"] = tuple(pattern)
        if values.get("compute_dtype", "auto") == "auto":
            import jax  # the platform decides: bfloat16 matmuls on accelerators, float32 on CPU

            values["compute_dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "num_repeats", "ssm_expand", "ssm_state", "ssm_conv", "scan_chunk"):
            if getattr(self, name) < 1:
                _fail(f"model.{name}", f"must be a positive integer, got {getattr(self, name)}", "set it >= 1")
        if self.scan_sequence_splits < 0:
            _fail("model.scan_sequence_splits", f"must be >= 0, got {self.scan_sequence_splits}",
                  "use 0 (the op chooses), 1 (no split) or the number of pieces")
        if not self.pattern:
            _fail("model.pattern", "is empty", 'name sublayers, e.g. "mamba,mlp,swa,mlp"')
        for p in self.pattern:
            if p not in SUBLAYERS:
                _fail("model.pattern", f"has unknown sublayer {p!r}", f"use only {', '.join(SUBLAYERS)}")
        if any(p in ("swa", "attn") for p in self.pattern):
            if self.num_heads < 1 or self.num_kv_heads < 1:
                _fail("model.num_heads", "heads must be positive", "set num_heads and num_kv_heads >= 1")
            if self.num_heads % self.num_kv_heads:
                _fail("model.num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}",
                      "choose num_kv_heads among the divisors of num_heads")
            if self.head_dim < 2 or self.head_dim % 2:
                _fail("model.head_dim", f"must be even for half-split rotary embeddings, got {self.head_dim}",
                      "use an even head_dim such as 64 or 128")
            if self.num_heads * self.head_dim != self.d_model:
                # The reference always has heads * head_dim == d_model; other shapes are allowed but
                # the Samba configs rely on it, so a mismatch is almost always a typo.
                _fail("model.head_dim", f"num_heads*head_dim = {self.num_heads * self.head_dim} "
                      f"differs from d_model={self.d_model}", "set head_dim = d_model // num_heads")
        if "swa" in self.pattern and self.window < 1:
            _fail("model.window", f"must be >= 1 for sliding-window attention, got {self.window}",
                  "use e.g. 2048 (the reference's window, current token included)")
        if "mlp" in self.pattern and self.mlp_hidden < 1:
            _fail("model.mlp_hidden", "must be positive", "use 8/3 * d_model, e.g. 4096 for d_model 1536")
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            _fail("model.compute_dtype", f"unknown dtype {self.compute_dtype!r}", "use float32, bfloat16 or float16")
        if self.decode_attention_implementation not in ("", "xla", "pallas"):
            _fail("model.decode_attention_implementation", f"unknown {self.decode_attention_implementation!r}",
                  "use '' (the platform's best), 'xla' or 'pallas'")
        if self.remat not in ("none", "block", "save_dots"):
            _fail("model.remat", f"unknown policy {self.remat!r}", "use none, block or save_dots")
        if self.loss_chunks < 0:
            _fail("model.loss_chunks", f"must be >= 0, got {self.loss_chunks}",
                  "use 0 (chunk once the logits would exceed 4 GiB), 1 (never) or a divisor of data.seq_len")
        if not 0 < self.dt_min <= self.dt_max:
            _fail("model.dt_min", f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}", "use 1e-3 and 1e-1")


def validate_run(config: Any, model_cfg: ModelConfig, process_count: int | None = None) -> None:
    """Checks the run-level fields (batch, sequence, schedule, files) before anything compiles.

    Each process loads an equal share of every micro-batch, so micro_batch_size must split evenly
    over `process_count` (default: jax's). Whether config.mesh splits the shapes is
    `sharding.check_model_fits_mesh`'s to say (sharding imports this module, not the reverse).
    """
    if process_count is None:
        import jax

        process_count = jax.process_count()
    seq_len = config.data.seq_len
    if seq_len < 1:
        _fail("data.seq_len", f"must be positive, got {seq_len}", "use e.g. 4096")
    if "swa" in model_cfg.pattern and model_cfg.window > seq_len:
        _fail("model.window", f"{model_cfg.window} is longer than data.seq_len={seq_len}, so it is full attention",
              "lower model.window to at most data.seq_len, or use the 'attn' sublayer for full attention")
    if model_cfg.loss_chunks > 1 and seq_len % model_cfg.loss_chunks:
        _fail("model.loss_chunks", f"{model_cfg.loss_chunks} does not divide data.seq_len={seq_len}",
              "use a divisor of data.seq_len, or 0 to let the loss choose")
    if config.batch_size < 1 or config.micro_batch_size < 1:
        _fail("batch_size", "batch sizes must be positive", "set batch_size and micro_batch_size >= 1")
    if config.batch_size % config.micro_batch_size:
        _fail("micro_batch_size", f"{config.micro_batch_size} does not divide batch_size={config.batch_size}",
              "choose a micro_batch_size that divides batch_size (accumulation steps = batch/micro)")
    if config.micro_batch_size % process_count:
        _fail("micro_batch_size", f"{config.micro_batch_size} is not divisible by the process count "
              f"{process_count} (each process takes an equal share)", f"use a multiple of {process_count}")
    if config.num_train_steps < 1:
        _fail("num_train_steps", "must be positive", "set num_train_steps >= 1")
    for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        if config[name] < 1:
            _fail(name, f"must be positive, got {config[name]}", "set it >= 1")
    if config.eval_steps < 0:
        _fail("eval_steps", f"must be >= 0, got {config.eval_steps}", "use e.g. 50 (0 evaluates nothing)")
    if not config.optimizer.learning_rate >= 0:  # also catches NaN
        _fail("optimizer.learning_rate", f"must be >= 0, got {config.optimizer.learning_rate}", "use e.g. 4e-4")
    if not 0 <= config.optimizer.warmup_fraction < 1:
        _fail("optimizer.warmup_fraction", "must be in [0, 1)", "use 0.01 (the reference's 1%)")
    if config.max_consecutive_bad_steps < 0:
        _fail("max_consecutive_bad_steps", f"must be >= 0, got {config.max_consecutive_bad_steps}",
              "use e.g. 5, or 0 to skip non-finite steps without ever stopping")
    tokenizer = config.data.tokenizer
    if tokenizer and not os.path.isfile(tokenizer):
        raise ConfigFileError(f"config.data.tokenizer: file {tokenizer!r} does not exist. Fix: point it at a "
                              f"SentencePiece .model file, or set it to \"\" to train one on the default corpus.")


def parameter_count(cfg: ModelConfig) -> dict[str, int]:
    """Analytic parameter count per sublayer kind and in total (matches the Flax model exactly)."""
    d, di, n, r = cfg.d_model, cfg.d_inner, cfg.ssm_state, cfg.resolved_dt_rank
    per = {
        "mamba": d * 2 * di + cfg.ssm_conv * di + di + di * (r + 2 * n) + r * di + di + di * n + di + di * d,
        "mlp": 3 * d * cfg.mlp_hidden,
        "swa": d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads),
    }
    per["attn"] = per["swa"]
    counts = {"embedding": cfg.vocab_size * d}
    for p in cfg.pattern:
        counts[p] = counts.get(p, 0) + per[p] * cfg.num_repeats
    counts["norms"] = d * (cfg.num_layers + 1)
    if not cfg.tie_embeddings:
        counts["lm_head"] = cfg.vocab_size * d
    counts["total"] = sum(counts.values())
    return counts


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Model FLOPs per token, MaxText's convention plus the scan's own work.

    Matmuls count 2 FLOPs per multiply-add (embedding lookup free, logits counted); causal full
    attention counts 4*T^2*H*Dh / 2 per sequence; sliding window 4*(T*W - W^2/2)*H*Dh; the
    selective scan counts mamba_ssm's 9*d_inner*d_state per token (+ d_inner each for D and the
    gate), and the depthwise conv 2*d_inner*d_conv. Training = 3x the forward pass.
    """
    d, di, n, r, t = cfg.d_model, cfg.d_inner, cfg.ssm_state, cfg.resolved_dt_rank, seq_len
    attn_dim = cfg.num_heads * cfg.head_dim
    fwd = 2.0 * cfg.vocab_size * d  # logits
    for p in cfg.pattern:
        if p == "mlp":
            f = 2.0 * 3 * d * cfg.mlp_hidden
        elif p == "mamba":
            f = 2.0 * (d * 2 * di + di * (r + 2 * n) + r * di + di * d)  # projections
            f += 2.0 * di * cfg.ssm_conv + 9.0 * di * n + 2.0 * di  # conv, scan, D and gate
        else:
            f = 2.0 * d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
            w = min(cfg.window, t) if p == "swa" else t
            # per sequence 4*(T*W - W^2/2)*H*Dh; W = T gives the causal 4*T^2/2*H*Dh.
            f += 4.0 * (t * w - w * w / 2) * attn_dim / t
        fwd += f * cfg.num_repeats
    return {"forward": fwd, "train": 3.0 * fwd}


def peak_flops_per_device(device_kind: str) -> float | None:
    """Dense bf16 peak for a `jax.Device.device_kind`, or None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak
    return None
