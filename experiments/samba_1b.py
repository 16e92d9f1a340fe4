"""Samba-1.3B (microsoft/Samba `Samba_1.3B`): 18 blocks, d 2304, 1330.2M parameters, 100B tokens.

python -m samba_jax.train --config=experiments/samba_1b.py --workdir=/tmp/samba_1b \
  --config.data.source='jsonl:/data/slimpajama/train/*.jsonl' --config.data.tokenizer=/data/llama2.model
"""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=100e9)
    c.model.update(vocab_size=32000, d_model=2304, num_repeats=9, pattern="mamba,mlp,swa,mlp",
                   num_heads=18, num_kv_heads=18, head_dim=128, window=2048, mlp_hidden=6144)
    # Keep matmul outputs, recompute the rest in the backward: on one H200 at micro-batch 8 x 4096
    # 714 ms/step in 63.1 GiB (remat=block 839 ms in 33.0 GiB; none runs out of memory; benchmarks/HISTORY.md).
    # Longer sequences (the seq_len variants) use remat=block, the smallest activation memory.
    c.model.remat = "save_dots" if c.data.seq_len <= 4096 else "block"
    return c
