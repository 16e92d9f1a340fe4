"""Samba-1.3B (microsoft/Samba `Samba_1.3B`): 18 blocks, d 2304, 1330.2M parameters, 100B tokens.

python -m samba_jax.train --config=experiments/samba_1b.py --workdir=/tmp/samba_1b \
  --config.data.source='jsonl:/data/slimpajama/train/*.jsonl' --config.data.tokenizer=/data/llama2.model
"""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=100e9)
    c.model.update(vocab_size=32000, d_model=2304, num_repeats=9, pattern="mamba,mlp,swa,mlp",
                   num_heads=18, num_kv_heads=18, head_dim=128, window=2048, mlp_hidden=6144)
    return c
