"""Print a model's parameter table and FLOPs per token without allocating its weights.

python -m samba_jax.summary --config=experiments/samba_1b.py

Parameters come from `jax.eval_shape` of the real initialiser (so the table is the model, not a
formula); FLOPs follow MaxText's convention (matmuls 2 FLOPs per MAC, causal attention halved,
sliding window T*W - W^2/2, training = 3x forward) plus the selective scan's own work.
"""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from samba_jax.config import ModelConfig, flops_per_token, parameter_count
from samba_jax.configs import command_line
from samba_jax.model.samba import abstract_params


def parameter_table(cfg: ModelConfig) -> list[tuple[str, str, int]]:
    """(module path, shapes, count) per module, from the abstract initialiser; scanned repeats stacked."""
    params = nn.unbox(abstract_params(cfg))
    rows: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        module = "/".join(names[:-1]) or names[0]
        rows.setdefault(module, []).append((names[-1], leaf.shape))
    table = []
    for module, leaves in rows.items():
        shapes = ", ".join(f"{name}{tuple(shape)}" for name, shape in leaves)
        table.append((module, shapes, sum(int(np.prod(s)) for _, s in leaves)))
    return table


def summary_text(config: Any) -> str:
    cfg = ModelConfig.from_config(config.model)
    seq = config.data.seq_len
    table = parameter_table(cfg)
    total = sum(n for _, _, n in table)
    analytic = parameter_count(cfg)["total"]
    assert total == analytic, f"initialiser has {total} parameters, formula {analytic}"  # both are ours
    width = max(len(m) for m, _, _ in table)
    lines = [f"Pattern {','.join(cfg.pattern)} x {cfg.num_repeats} repeats "
             f"({cfg.num_layers} residual sublayers); blocks/* parameters are stacked over repeats.",
             f"{'module':<{width}}  {'parameters':>14}  shapes"]
    lines += [f"{m:<{width}}  {n:>14,}  {s}" for m, s, n in table]
    lines.append(f"{'total':<{width}}  {total:>14,}  ({total / 1e6:.1f}M)")
    flops = flops_per_token(cfg, seq)
    lines.append(f"FLOPs per token at seq {seq}: forward {flops['forward'] / 1e9:.3f} GFLOP, "
                 f"training {flops['train'] / 1e9:.3f} GFLOP (MaxText convention: matmuls 2/MAC, causal "
                 f"attention halved, sliding window T*W-W^2/2, training 3x forward; plus the selective "
                 f"scan 9*d_inner*d_state, its D and gate, and the conv); for comparison 6N = {6 * total / 1e9:.3f}.")
    tokens = config.batch_size * seq
    lines.append(f"Per optimizer step ({config.batch_size} x {seq} tokens): "
                 f"{flops['train'] * tokens / 1e15:.2f} PFLOP; run of {config.num_train_steps} steps: "
                 f"{flops['train'] * tokens * config.num_train_steps / 1e18:,.1f} EFLOP "
                 f"({tokens * config.num_train_steps / 1e9:.1f}B tokens).")
    return "\n".join(lines)


def main():
    # Flags are defined here, not at import, so `summary_text` can be imported next to other CLIs.
    config = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py[:variant]).")
    flags.mark_flags_as_required(["config"])
    command_line.exit_on_config_flag_error(sys.argv)
    app.run(lambda argv: print(summary_text(config.value)))


if __name__ == "__main__":
    main()
