"""Llama-style full-attention baseline (microsoft/Samba `LLaMA_1.3B`): 20 blocks, d 2304, 1347.8M.

Same recipe and init as Samba-1.3B (the reference's `mamba_init`, tied head); attention is full
causal with 18 heads (set num_kv_heads for GQA).
"""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=100e9)
    c.model.update(vocab_size=32000, d_model=2304, num_repeats=20, pattern="attn,mlp",
                   num_heads=18, num_kv_heads=18, head_dim=128, mlp_hidden=6144)
    return c
