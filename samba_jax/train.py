"""Train a Samba model: `python -m samba_jax.train --config=experiments/tiny.py --workdir=/tmp/tiny`.

Any config field can be overridden, e.g. `--config.num_train_steps=100 --config.model.window=512`;
variants go after a colon, `--config=experiments/samba_1b.py:seq_len=8192`. Rerunning the same
command resumes from the newest checkpoint in the workdir.

Exit codes: 0 done; 143 (128 + SIGTERM) or 130 (SIGINT) after saving on a signal or preemption
notice, so rerunning resumes; 2 a config error (nothing ran); 3 the loss or gradients stayed
non-finite for `max_consecutive_bad_steps` steps; 4 a damaged checkpoint with
`checkpoint_fail_on_damage` (or every checkpoint damaged). Schedulers should retry only 143.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from samba_jax import distributed
from samba_jax.checkpoint import DamagedCheckpointError
from samba_jax.config import ConfigError
from samba_jax.configs import command_line
from samba_jax.train_loop import train_and_evaluate
from samba_jax.trainer import NonFiniteError

# Failures that a rerun of the same command would repeat: a message, no traceback, a distinct code.
EXIT_CODES = ((ConfigError, 2), (NonFiniteError, 3), (DamagedCheckpointError, 4))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_STOP_AFTER = flags.DEFINE_integer("stop_after_steps", 0, "Save and exit after this many steps of this run "
                                   "(e.g. to fit a job time limit); rerun the same command to continue.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for a multi-process job "
                                   "outside TPU pods/SLURM/Open MPI (which are detected); with --num_processes and "
                                   "--process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Orbax and grain log every save at INFO; keep the console to our own progress lines.
    logging.set_verbosity(logging.WARNING)
    try:
        # Before anything touches a device: join the other processes of a multi-host job.
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        train_and_evaluate(_CONFIG.value, _WORKDIR.value, _STOP_AFTER.value)
    except tuple(kind for kind, _ in EXIT_CODES) as e:
        code = next(code for kind, code in EXIT_CODES if isinstance(e, kind))
        print(f"ERROR ({type(e).__name__}): {e}", file=sys.stderr, flush=True)
        sys.exit(code)


if __name__ == "__main__":
    command_line.exit_on_config_flag_error(sys.argv)  # one line, not ml_collections' traceback
    app.run(main)
