"""Orbax checkpoints of the train state and the grain data-iterator state.

One `CheckpointManager` per run at `<workdir>/checkpoints`, with two items: `state` (params,
optimizer state, step; saved asynchronously) and `data_iter` (grain's JSON iterator state), so a
restarted run continues with exactly the batches it would have seen. Restores go into abstract
targets (`jax.eval_shape`) carrying the current shardings, never into an initialised state, so
two copies never coexist in memory.

Faults: orbax writes each step to `<step>.orbax-checkpoint-tmp-*` and renames it when complete,
so a save killed half-way is never listed (and the tmp dir is removed when the next run opens the
manager). A complete-looking step whose files were damaged later is skipped for the previous one
by `restore_latest`. Checkpoints hold arrays (tensorstore) and JSON only: reading one never runs
code, unlike pickle.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from samba_jax import metrics


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
        # Handlers given up front so `item_metadata` can be read before the first restore.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iter": grain.checkpoint.CheckpointHandler()},
        options=options,
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started."""
    args = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


class DamagedCheckpointError(RuntimeError):
    """A checkpoint could not be read (and the config asked to stop rather than fall back)."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint of a different model: older checkpoints would not fit either."""


def _leaf_signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
    """Sorted (shape, dtype) of every array leaf: comparable across dict/namedtuple spellings."""
    return sorted((tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree))


def _short_error(e: BaseException, limit: int = 400) -> str:
    """First line of an exception and of each cause (tensorstore appends pages of JSON spec)."""
    parts = []
    while e is not None and len(parts) < 4:
        first = (str(e).strip().splitlines() or [""])[0]
        parts.append(f"{type(e).__name__}: {first}")
        e = e.__cause__ or e.__context__
    text = " <- ".join(parts)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_fits(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> bool:
    """Reads step's metadata; raises CheckpointMismatchError if its arrays do not fit this config.

    Returns whether the checkpoint holds a data-iterator item. Unreadable metadata propagates as
    the library's error and counts as damage.
    """
    meta = manager.item_metadata(step)
    state_meta = meta["state"]
    if state_meta is None:
        raise FileNotFoundError(f"no readable state item in {manager.directory / str(step)}")
    tree = getattr(state_meta, "tree", state_meta)
    if _leaf_signature(tree) != _leaf_signature(abstract_state):
        raise CheckpointMismatchError(
            f"The checkpoint at step {step} in {manager.directory} does not fit this config's model or data "
            f"pipeline (its arrays differ in shape, dtype or number). Fix: rerun with the config the workdir "
            f"was created with (its config.json), or use a new --workdir.")
    return "data_iter" in meta  # grain reports no metadata (None), only presence


def _iterator_fits_process_count(path: str, step: int) -> bool:
    """Whether the checkpoint's data-iterator files were written by as many processes as run now.

    grain keeps one position per process (`process_I-of-N.json`); a job restarted with another
    process count cannot map them, so the model and optimizer resume exactly and the data order
    starts over (with a warning), instead of the checkpoint being taken for damaged.
    """
    files = os.listdir(os.path.join(path, "data_iter")) if os.path.isdir(os.path.join(path, "data_iter")) else []
    written = sorted({f.split("-of-")[1].removesuffix(".json") for f in files if "-of-" in f})
    count = str(jax.process_count())
    if not written or count in written:
        return True
    warnings.warn(f"Checkpoint {path} (step {step}) was written by {', '.join(written)} process(es) and this job "
                  f"has {count}: parameters and optimizer state are restored (resharded onto this mesh), but the "
                  f"data iterators cannot be mapped, so the data order starts over from the beginning.",
                  stacklevel=3)
    return False


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves a damaged step out of the manager's directory (kept for inspection) so new saves can reuse it."""
    src = os.path.join(str(manager.directory), str(step))
    dst = os.path.join(os.path.dirname(str(manager.directory)), "checkpoints_damaged", f"{step}.{int(time.time())}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"samba_set_aside_{step}")
    manager.reload()
    return dst


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any, data_iter: Any,
                   fail_on_damage: bool = False) -> tuple[int, Any] | None:
    """Restores the newest checkpoint that reads back, into `abstract_state`'s shapes and shardings.

    `data_iter` (a grain iterator) has its position set in place. A checkpoint that cannot be read
    (truncated or missing files, bad metadata) is named in a warning, moved to
    `<workdir>/checkpoints_damaged/`, and the previous one is tried; with `fail_on_damage` a
    `DamagedCheckpointError` is raised instead. A checkpoint of a different model raises
    `CheckpointMismatchError` (a ValueError). Returns (step, state), or None when the directory
    holds no checkpoint.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
        path = os.path.join(str(manager.directory), str(step))
        try:
            has_iter = _check_fits(manager, step, abstract_state)
            args = {"state": ocp.args.StandardRestore(abstract_state)}
            if data_iter is not None and has_iter and _iterator_fits_process_count(path, step):
                args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
            restored = manager.restore(step, args=ocp.args.Composite(**args))
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001  (orbax/tensorstore raise bare Exception on read errors)
            error = e
        else:
            if damaged:
                metrics.log(f"Resuming from step {step} instead of the damaged newer checkpoint(s) {damaged}.")
            return step, restored["state"]
        message = f"Checkpoint {path} (step {step}) is damaged and cannot be restored: {_short_error(error)}."
        if fail_on_damage:
            raise DamagedCheckpointError(
                f"{message} Fix: move {path} out of the way to resume from the previous checkpoint "
                f"(or set --config.checkpoint_fail_on_damage=False to do that automatically).") from error
        moved = _set_aside(manager, step)
        damaged.append(step)
        warnings.warn(f"{message} Moved it to {moved}; trying the previous checkpoint.", stacklevel=2)
    if damaged:
        raise DamagedCheckpointError(
            f"Every checkpoint in {manager.directory} is damaged (steps {damaged}, now in "
            f"{os.path.dirname(str(manager.directory))}/checkpoints_damaged). Fix: restore them from a backup, "
            f"or delete {manager.directory} to start from scratch.")
    return None


def describe_latest(manager: ocp.CheckpointManager) -> str:
    """The newest saved checkpoint as 'PATH (step N)', for error messages."""
    step = manager.latest_step()
    if step is None:
        return f"none yet in {manager.directory} (the run would start from scratch)"
    return f"{os.path.join(str(manager.directory), str(step))} (step {step})"
