"""The default experiment: a small Samba that trains on 2 CPU cores in minutes, offline.

Same architecture as Samba (Mamba+MLP and SWA+MLP blocks alternating, tied head, reference init)
at toy width, on the running Python's own standard library (pydoc topics and .py sources) with a
SentencePiece tokenizer trained on it on first use and cached in the workdir.

python -m samba_jax.train --config=experiments/tiny.py --workdir=/tmp/samba_tiny
"""

from samba_jax.configs.base import base_config, parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, steps=150)
    c = base_config()
    c.model.update(vocab_size=4096, d_model=128, num_repeats=2, pattern="mamba,mlp,swa,mlp",
                   num_heads=2, num_kv_heads=2, head_dim=64, window=64, mlp_hidden=384,
                   # CPU's "chunked" scan: 4-step chunks made the train step 1.4 -> 0.95 s on 2 cores
                   # (shorter in-chunk associative scans; on a GPU the fused kernel reads this as its
                   # state-saving interval).
                   scan_chunk=4)
    c.data.update(source="stdlib", seq_len=128)
    c.optimizer.update(learning_rate=2e-3, warmup_fraction=0.05)  # small models take larger steps
    c.batch_size = 32
    c.micro_batch_size = 32
    c.num_train_steps = arg.steps
    c.log_every_steps = 10
    c.eval_every_steps = 25
    c.eval_steps = 8
    c.checkpoint_every_steps = 100
    c.seed = 3407
    return c
