"""Samba-1.3B (microsoft/Samba `Samba_1.3B`): 18 blocks, d 2304, 1330.2M parameters, 100B tokens.

python -m samba_jax.train --config=experiments/samba_1b.py --workdir=/tmp/samba_1b \
  --config.data.source='jsonl:/data/slimpajama/train/*.jsonl' --config.data.tokenizer=/data/llama2.model
"""

from samba_jax.configs.base import base_config, parse_arg, shrink_for_local_run


def get_config(arg=None):
    arg = parse_arg(arg, seq_len=4096, runlocal=False)
    c = base_config()
    c.model.update(vocab_size=32000, d_model=2304, num_repeats=9, pattern="mamba,mlp,swa,mlp",
                   num_heads=18, num_kv_heads=18, head_dim=128, window=2048, mlp_hidden=6144)
    c.data.seq_len = arg.seq_len
    c.batch_size = 512 * 4096 // arg.seq_len
    c.num_train_steps = 47684  # 100e9 / 2**21 tokens
    if arg.runlocal:
        shrink_for_local_run(c)
    return c
