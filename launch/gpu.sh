#!/usr/bin/env bash
# Run an experiment on one GPU host (all local GPUs join the mesh automatically).
#
#   launch/gpu.sh configs/demo.py /data/fifa_runs/demo [--config.key=value ...]
#
# Installs (launch/gpu_venv.sh) fifa_jax with the CUDA extra (and the demo's MiniLM files, without their PyTorch
# dependency) into ./.venv-gpu on first use, and again when setup.py changed or an install did
# not finish. Rerunning the same line resumes: finished stages are skipped (see README,
# "Stages and resuming").
set -euo pipefail
config=${1:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}
shift 2
cd "$(dirname "$0")/.."
launch/gpu_venv.sh
# Let XLA take GPU memory as it needs it rather than 75% up front (the scorer and the judge share
# the card with the input pipeline's host work only, so either setting is safe).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec .venv-gpu/bin/python -m fifa_jax.main --config "$config" --workdir "$workdir" "$@"
