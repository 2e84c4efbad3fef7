#!/usr/bin/env bash
# Run an experiment on every worker of a TPU VM or pod slice at once.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/pickapic.py /mnt/shared/run1 \
#       [--config.key=value ...]
#
# Every worker runs the same command; fifa_jax.parallel calls jax.distributed.initialize() when
# it sees several TPU workers (mesh.distributed="auto"), and the mesh spans all chips of all
# hosts. WORKDIR must be a file system every worker sees at the same path (Filestore/NFS, or a
# gcsfuse mount): stages read each other's outputs from it. The repository is copied to each
# worker's home directory with `gcloud ... scp` first.
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse "$repo" "$TPU_NAME":~/fifa_jax --zone "$ZONE" --worker=all
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/fifa_jax
  [ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'; }
  .venv/bin/python -m fifa_jax.main --config $(printf %q "$config") --workdir $(printf %q "$workdir")$overrides"
