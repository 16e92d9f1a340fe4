#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker runs the same command; JAX finds the others itself.
#
#   launch/tpu_pod.sh --tpu=samba-v5p --zone=us-east5-a --project=my-proj --accelerator=v5p-64 \
#     --create --config=experiments/samba_1b.py --workdir=gs://my-bucket/samba_1b [--dry-run] [-- --config.x=y ...]
#
# --create asks for the slice as a queued resource (spot unless --no-spot) and waits for it; without
# it the TPU VM must exist. The repository is copied to every worker, installed, and trained with
# `python -m samba_jax.train`; arguments after `--` are passed to it. --dry-run prints each command.
set -euo pipefail

TPU="" ZONE="" PROJECT="" ACCEL="" RUNTIME="v2-alpha-tpuv5" CONFIG="" WORKDIR="" CREATE=0 SPOT=1 DRY=0
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;; --zone=*) ZONE="${1#*=}" ;; --project=*) PROJECT="${1#*=}" ;;
    --accelerator=*) ACCEL="${1#*=}" ;; --runtime=*) RUNTIME="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;; --workdir=*) WORKDIR="${1#*=}" ;;
    --create) CREATE=1 ;; --no-spot) SPOT=0 ;; --dry-run) DRY=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
for name in TPU ZONE PROJECT CONFIG WORKDIR; do
  if [[ -z "${!name}" ]]; then echo "tpu_pod.sh: --${name,,}=... is required" >&2; exit 2; fi
done
if [[ $CREATE == 1 && -z "$ACCEL" ]]; then echo "tpu_pod.sh: --create needs --accelerator=TYPE (e.g. v5p-64)" >&2; exit 2; fi
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_pod.sh: --workdir must be a gs:// path that every worker can reach, got $WORKDIR" >&2; exit 2
fi

run() {  # print, and run unless --dry-run
  printf '%q ' "$@"; echo
  if [[ $DRY == 0 ]]; then "$@"; fi
}
GCLOUD=(gcloud --project="$PROJECT")
ON_ALL=("${GCLOUD[@]}" compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all)

if [[ $CREATE == 1 ]]; then
  run "${GCLOUD[@]}" compute tpus queued-resources create "$TPU" --node-id="$TPU" --zone="$ZONE" \
    --accelerator-type="$ACCEL" --runtime-version="$RUNTIME" $([[ $SPOT == 1 ]] && echo --spot)
  run bash -c "until ${GCLOUD[*]} compute tpus queued-resources describe $TPU --zone=$ZONE --format='value(state.state)' | grep -q ACTIVE; do sleep 30; done"
fi
run "${GCLOUD[@]}" compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU":~/samba_jax
run "${ON_ALL[@]}" --command="cd ~/samba_jax && pip install -q -e '.[tpu]'"
TRAIN="cd ~/samba_jax && python -m samba_jax.train --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}"
run "${ON_ALL[@]}" --command="$TRAIN"
