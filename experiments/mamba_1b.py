"""Pure Mamba baseline (microsoft/Samba `Mamba_1.3B`): 48 Mamba layers, no MLP, d 2048, 1334.7M.

The reference's `MBlock` is Add -> RMSNorm -> Mamba with the residual in float32, which is the
same computation as our pre-norm residual sublayer.
"""

from samba_jax.configs.base import base_config, parse_arg, shrink_for_local_run


def get_config(arg=None):
    arg = parse_arg(arg, seq_len=4096, runlocal=False)
    c = base_config()
    c.model.update(vocab_size=32000, d_model=2048, num_repeats=48, pattern="mamba")
    c.data.seq_len = arg.seq_len
    c.batch_size = 512 * 4096 // arg.seq_len
    c.num_train_steps = 47684
    if arg.runlocal:
        shrink_for_local_run(c)
    return c
