"""Mamba -> SWA -> MLP per block (microsoft/Samba `Mamba_SWA_MLP_1.3B`): 12 blocks, d 2304, 1239.4M."""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=100e9)
    c.model.update(vocab_size=32000, d_model=2304, num_repeats=12, pattern="mamba,swa,mlp",
                   num_heads=18, num_kv_heads=18, head_dim=128, window=2048, mlp_hidden=6144)
    return c
