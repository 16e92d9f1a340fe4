"""Orbax checkpoints of the train state and the grain data-iterator state.

One `CheckpointManager` per run at `<workdir>/checkpoints`, with two items: `state` (params,
optimizer state, step; saved asynchronously) and `data_iter` (grain's JSON iterator state), so a
restarted run continues with exactly the batches it would have seen. Restores go into abstract
targets (`jax.eval_shape`) carrying the current shardings, never into an initialised state, so
two copies never coexist in memory.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def make_manager(workdir: str, save_every: int, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager that saves every `save_every` steps (and on preemption) and keeps the latest `keep`."""
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_every),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,  # a save killed half-way leaves only a tmp dir, removed here
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        item_names=("state", "data_iter"),
        options=options,
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any) -> tuple[int, Any] | None:
    """Restores the newest complete checkpoint into `abstract_state`'s shapes and shardings.

    `data_iter` (a grain iterator) has its position set in place. Returns (step, state) or None
    when the directory holds no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None and "data_iter" in manager.item_metadata(step):
        args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:  # orbax's messages name tensors, not the cause
        raise ValueError(
            f"The checkpoint at step {step} in {manager.directory} does not fit this config's model or data "
            f"pipeline ({type(e).__name__}: {str(e)[:300]}). Fix: rerun with the config the workdir was "
            f"created with (its config.json), or use a new --workdir.") from e
    return step, restored["state"]

