#!/usr/bin/env bash
# Train on TPU slices of a GKE cluster through xpk (github.com/AI-Hypercomputer/xpk).
#
#   launch/gke_xpk.sh --cluster=my-cluster --project=my-proj --zone=us-east5 --tpu-type=v5p-256 \
#     --num-slices=2 --image=us-docker.pkg.dev/my-proj/samba/samba_jax:latest \
#     --config=experiments/samba_1b.py --workdir=gs://my-bucket/samba_1b [--dry-run] [-- --config.x=y ...]
#
# The image must hold this repository installed (`pip install -e .` and jax[tpu]). With more than
# one slice the data-parallel degree across slices is set for you (--config.mesh.dcn_data), so the
# slow data-centre network carries only gradient reductions. xpk restarts the workload after a
# preemption (--max-restarts) and the run resumes from its checkpoint. --dry-run prints the command.
set -euo pipefail

CLUSTER="" PROJECT="" ZONE="" TPU_TYPE="" SLICES=1 IMAGE="" CONFIG="" WORKDIR="" NAME="samba-jax" DRY=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster=*) CLUSTER="${1#*=}" ;; --project=*) PROJECT="${1#*=}" ;; --zone=*) ZONE="${1#*=}" ;;
    --tpu-type=*) TPU_TYPE="${1#*=}" ;; --num-slices=*) SLICES="${1#*=}" ;; --image=*) IMAGE="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;; --workdir=*) WORKDIR="${1#*=}" ;; --name=*) NAME="${1#*=}" ;;
    --dry-run) DRY=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gke_xpk.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for pair in cluster:CLUSTER project:PROJECT zone:ZONE tpu-type:TPU_TYPE image:IMAGE config:CONFIG workdir:WORKDIR; do
  var="${pair#*:}"
  if [[ -z "${!var}" ]]; then echo "gke_xpk.sh: --${pair%%:*}=... is required" >&2; exit 2; fi
done
if [[ "$WORKDIR" != gs://* ]]; then echo "gke_xpk.sh: --workdir must be a gs:// path, got $WORKDIR" >&2; exit 2; fi
DCN=""
if [[ "$SLICES" -gt 1 ]]; then DCN="--config.mesh.dcn_data=$SLICES"; fi
TRAIN="python -m samba_jax.train --config=$CONFIG --workdir=$WORKDIR $DCN ${EXTRA[*]:-}"
CMD=(xpk workload create --cluster="$CLUSTER" --project="$PROJECT" --zone="$ZONE" --workload="$NAME"
     --tpu-type="$TPU_TYPE" --num-slices="$SLICES" --docker-image="$IMAGE" --max-restarts=10 --command="$TRAIN")
printf '%q ' "${CMD[@]}"; echo
if [[ $DRY == 0 ]]; then "${CMD[@]}"; fi
