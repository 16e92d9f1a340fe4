#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one process per GPU (srun), JAX's SLURM detection joins them.
#
#   launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=24:00:00 \
#     --config=experiments/samba_1b.py --workdir=/shared/runs/samba_1b [--dry-run] [-- --config.x=y ...]
#
# Writes <workdir>/slurm/train.sbatch and submits it. SLURM sends SIGTERM two minutes before the
# time limit (--signal); the trainer saves and exits 143, and the batch script requeues the job,
# which resumes from the checkpoint. Exit codes 2/3/4 (config, divergence, damaged checkpoint) are
# not retried. --dry-run prints the script and the sbatch command without submitting.
set -euo pipefail

NODES=1 GPUS=8 PARTITION="" TIME="24:00:00" CONFIG="" WORKDIR="" DRY=0 ACCOUNT=""
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;; --gpus-per-node=*) GPUS="${1#*=}" ;; --partition=*) PARTITION="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;; --account=*) ACCOUNT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;; --workdir=*) WORKDIR="${1#*=}" ;; --dry-run) DRY=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "slurm.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$CONFIG" || -z "$WORKDIR" ]]; then echo "slurm.sh: --config=... and --workdir=... are required" >&2; exit 2; fi

REPO="$(cd "$(dirname "$0")/.." && pwd)"
SCRIPT="$WORKDIR/slurm/train.sbatch"
BODY="#!/usr/bin/env bash
#SBATCH --job-name=samba_jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=8
#SBATCH --time=$TIME
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output=$WORKDIR/slurm/%j.out
${PARTITION:+#SBATCH --partition=$PARTITION}
${ACCOUNT:+#SBATCH --account=$ACCOUNT}
cd $REPO
# SLURM signals this script (B:TERM); pass it to srun, which passes it to every task. A task saves
# and exits 143; then requeue, and the requeued job resumes from the checkpoint.
srun --kill-on-bad-exit=0 python -m samba_jax.train --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-} &
PID=\$!
trap 'kill -TERM \$PID' TERM
wait \$PID; CODE=\$?
while kill -0 \$PID 2>/dev/null; do wait \$PID; CODE=\$?; done  # wait returned early for the trap
if [[ \$CODE == 143 ]]; then scontrol requeue \$SLURM_JOB_ID; fi
exit \$CODE"

echo "# $SCRIPT"
echo "$BODY"
echo "sbatch $SCRIPT"
if [[ $DRY == 0 ]]; then
  mkdir -p "$WORKDIR/slurm"
  printf '%s\n' "$BODY" > "$SCRIPT"
  sbatch "$SCRIPT"
fi
