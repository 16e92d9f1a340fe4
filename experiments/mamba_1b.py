"""Pure Mamba baseline (microsoft/Samba `Mamba_1.3B`): 48 Mamba layers, no MLP, d 2048, 1334.7M.

The reference's `MBlock` is Add -> RMSNorm -> Mamba with the residual in float32, which is the
same computation as our pre-norm residual sublayer.
"""

from samba_jax.configs.base import pretraining_config


def get_config(arg=None):
    c = pretraining_config(arg, train_tokens=100e9)
    c.model.update(vocab_size=32000, d_model=2048, num_repeats=48, pattern="mamba")
    return c
