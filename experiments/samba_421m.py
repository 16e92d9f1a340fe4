"""Samba-421M (microsoft/Samba `Samba_421M`): 12 blocks, d 1536, 421.8M parameters, 20B tokens.

python -m samba_jax.train --config=experiments/samba_421m.py --workdir=/tmp/samba_421m \
  --config.data.source='jsonl:/data/slimpajama/train/*.jsonl' --config.data.tokenizer=/data/llama2.model
"""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=20e9)
    c.model.update(vocab_size=32000, d_model=1536, num_repeats=6, pattern="mamba,mlp,swa,mlp",
                   num_heads=12, num_kv_heads=12, head_dim=128, window=2048, mlp_hidden=4096)
    # Keep matmul outputs, recompute the rest in the backward: on one H200 at micro-batch 8 x 4096
    # 271 ms/step in 28.9 GiB, against 293 ms in 70.4 GiB without remat (benchmarks/HISTORY.md).
    # Longer sequences (the seq_len variants) use remat=block, the smallest activation memory.
    c.model.remat = "save_dots" if c.data.seq_len <= 4096 else "block"
    return c
