"""Train a Samba model: `python -m samba_jax.train --config=experiments/tiny.py --workdir=/tmp/tiny`.

Any config field can be overridden, e.g. `--config.num_train_steps=100 --config.model.window=512`;
variants go after a colon, `--config=experiments/samba_1b.py:seq_len=8192`. Rerunning the same
command resumes from the newest checkpoint in the workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from samba_jax.train_loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_STOP_AFTER = flags.DEFINE_integer("stop_after_steps", 0, "Save and exit after this many steps of this run "
                                   "(e.g. to fit a job time limit); rerun the same command to continue.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Orbax and grain log every save at INFO; keep the console to our own progress lines.
    logging.set_verbosity(logging.WARNING)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value, _STOP_AFTER.value)


if __name__ == "__main__":
    app.run(main)
