"""Sliding-window-only baseline (microsoft/Samba `LLaMA_1.3B_SWA`): 20 blocks of SWA + MLP, 1347.8M."""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=100e9)
    c.model.update(vocab_size=32000, d_model=2304, num_repeats=20, pattern="swa,mlp",
                   num_heads=18, num_kv_heads=18, head_dim=128, window=2048, mlp_hidden=6144)
    return c
