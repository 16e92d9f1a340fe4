"""Llama-3-style GQA Transformer of Samba-1.3B's size: the paper's inference baseline (issue 7).

Full causal attention with 4 KV heads (GQA, cuDNN on GPU), d 2048, 16 heads of 128, SwiGLU 8192,
RoPE base 500000, 21 blocks: 1342.8M parameters with the same 32000-token vocabulary and tied head
as samba_1b (1330.2M; +0.9%). Same recipe as the other 1B experiments, so it also trains.
"""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=100e9)
    c.model.update(vocab_size=32000, d_model=2048, num_repeats=21, pattern="attn,mlp", num_heads=16,
                   num_kv_heads=4, head_dim=128, mlp_hidden=8192, rope_base=500000.0)
    return c
