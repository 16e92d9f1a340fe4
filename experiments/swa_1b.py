"""Sliding-window-only baseline (microsoft/Samba `LLaMA_1.3B_SWA`): 20 blocks of SWA + MLP, 1347.8M."""

from samba_jax.configs.base import base_config, parse_arg, shrink_for_local_run


def get_config(arg=None):
    arg = parse_arg(arg, seq_len=4096, runlocal=False)
    c = base_config()
    c.model.update(vocab_size=32000, d_model=2304, num_repeats=20, pattern="swa,mlp",
                   num_heads=18, num_kv_heads=18, head_dim=128, window=2048, mlp_hidden=6144)
    c.data.seq_len = arg.seq_len
    c.batch_size = 512 * 4096 // arg.seq_len
    c.num_train_steps = 47684
    if arg.runlocal:
        shrink_for_local_run(c)
    return c
