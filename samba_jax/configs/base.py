"""The shared run configuration: the Samba reference's recipe as defaults.

Experiment files (`experiments/*.py`) call `base_config()` and set the model shape. Every field
can be overridden on the command line as `--config.a.b=value`; variants go after a colon,
`--config=experiments/samba_1b.py:runlocal,seq_len=1024` (parsed by `parse_arg`).
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults):
    """big_vision-style variant string: "a=1,b=x,flag" -> ConfigDict(a=1, b='x', flag=True).

    Values take the type of the default given for that key; bare names are booleans.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown experiment variant {key!r}; this experiment accepts {sorted(defaults)}.")
        default = defaults[key]
        if not sep:
            result[key] = True
        elif isinstance(default, bool):
            result[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            result[key] = type(default)(value)
    return result


def base_config() -> ml_collections.ConfigDict:
    """Recipe of microsoft/Samba `pretrain.py`; the model fields are the Samba-421M shape."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        vocab_size=32000,  # Llama-2 SentencePiece
        d_model=1536,
        num_repeats=6,  # repeats of the pattern; 6 x (Mamba+MLP, SWA+MLP) = the reference's 12 blocks
        pattern="mamba,mlp,swa,mlp",
        num_heads=12,
        num_kv_heads=12,
        head_dim=128,
        window=2048,  # keys i-2047..i, flash-attn window_size=(2047, 0)
        mlp_hidden=4096,  # 8/3 * d_model
        ssm_expand=2,
        ssm_state=16,
        ssm_conv=4,
        dt_rank=0,  # 0: ceil(d_model / 16)
        dt_min=1e-3,
        dt_max=1e-1,
        dt_init_floor=1e-4,
        rope_base=10000.0,
        norm_eps=1e-5,
        tie_embeddings=True,
        compute_dtype="auto",  # bfloat16 on GPU/TPU, float32 on CPU
        scan_implementation="",  # "" = best for the platform; reference | associative | chunked
        scan_chunk=64,
        scan_sequence_splits=0,  # 0 = the op chooses (GPU kernel at small batch x long sequence); 1 = never split
        # "" = best for the platform (cudnn on GPU, else banded); reference | banded | cudnn
        attention_implementation="",
        attention_block=0,
        decode_attention_implementation="",  # generation: "" = pallas for SWA on GPU, else xla
        remat="none",  # none | block | save_dots
    ))

    # Device mesh (samba_jax/sharding.py): degrees of data, fsdp, tensor and context parallelism;
    # -1 takes the remaining devices. dcn_* are the across-slice degrees of multi-slice TPU jobs.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, context=1,
                                            dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_context=1))
    # Logical axis -> mesh axes, as ((name, axes), ...); empty = sharding.DEFAULT_RULES.
    c.sharding_rules = ()

    c.data = ml_collections.ConfigDict(dict(
        # "stdlib" (offline default corpus), "text:GLOB", "jsonl:GLOB", "array_record:DIR" (written by
        # `python -m samba_jax.data.prepare`), "tfds:NAME[/CONFIG][:SPLIT]" or a token-weighted mixture
        # "mix:0.7*jsonl:/a/*.jsonl,0.3*array_record:/b" (see samba_jax/data/sources.py).
        source="stdlib",
        # Validation documents: "" = the default corpus's validation split for "stdlib", else documents
        # held out of `source` (holdout_permille per 1000, never trained on; 0: no validation).
        eval_source="",
        holdout_permille=10,
        tokenizer="",  # SentencePiece .model; "" trains one on the default corpus (stdlib only)
        seq_len=4096,
        jsonl_field="text",
        tfds_data_dir="",  # TFDS data_dir of "tfds:" sources; "" = TFDS's default (~/tensorflow_datasets)
        tfds_text_feature="text",  # the text feature of "tfds:" examples
        worker_count=0,
    ))

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=4e-4,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,  # on all parameters, as the reference (no mask)
        warmup_fraction=0.01,  # linear warm-up from 0 over 1% of steps
        min_lr_ratio=0.1,  # cosine to lr/10
        grad_clip=1.0,
    ))

    c.batch_size = 512  # global sequences per optimizer step (512 x 4096 = 2M tokens)
    c.micro_batch_size = 8  # global sequences per accumulation step; raise it with more devices
    c.num_train_steps = 9537  # 20B tokens for the 421M model
    c.log_every_steps = 10
    c.eval_every_steps = 1000
    c.eval_steps = 50  # validation batches (of micro_batch_size sequences) per evaluation
    # Also validate at these lengths ("4096,8192,16384", the reference's), logged as eval_loss@L; a batch
    # at L holds about micro_batch_size * seq_len tokens.
    c.eval_lengths = ""
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    c.async_checkpointing = True
    c.checkpoint_fail_on_damage = False  # False: warn, set a damaged checkpoint aside, resume from the previous one
    c.max_consecutive_bad_steps = 5  # non-finite steps are skipped; this many in a row stop the run (0: never)
    c.seed = 3407
    return c


def pretraining_config(arg: str | None, train_tokens: float) -> ml_collections.ConfigDict:
    """The recipe at 2**21 tokens per step for `train_tokens` tokens, with the shared variants.

    Variants: `seq_len=N` (batch 2**21 / N sequences, so tokens per step stay the same) and
    `runlocal` (the full-size model for 4 tiny steps: a smoke test, not training).
    """
    arg = parse_arg(arg, seq_len=4096, runlocal=False)
    c = base_config()
    c.data.seq_len = arg.seq_len
    c.batch_size = 2**21 // arg.seq_len
    c.num_train_steps = round(train_tokens / 2**21)
    if arg.runlocal:
        c.batch_size, c.micro_batch_size, c.num_train_steps = 2, 1, 4
        c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
        c.eval_steps = 1
    return c


def load_experiment(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/experiment.py[:variant]` outside absl flags (benchmarks, tests, notebooks)."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Experiment file {path!r} does not exist; experiments live in experiments/*.py.")
    module_spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
