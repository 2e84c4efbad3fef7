#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one call, for a short device lease.
#
# Prepare here (once):  echo /.whl/ >> .git/info/exclude; pip download the missing wheels for
#   the GPU image's Python (ml-collections; diffusers for the parity tests) into .whl/ (see
#   the device tool's README), then run on the device with carry [".whl"]:
#       bash benchmarks/gpu_check.sh
# Writes logs and JSON to $OUT (or ./gpu_out). Sections run in order of value and each is
# time-limited, so a short lease still returns the first ones. Record the results, with the
# card and versions printed first, in benchmarks/RESULTS.md.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/card.txt"
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())" | tee -a "$out/card.txt"

run() {  # run NAME SECONDS CMD...: one section, its log under $out
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "--- $name rc=$? ; tail:"; tail -n 15 "$out/$name.log"
}
run knn 150 python3 benchmarks/knn.py --gpu-size 1048576 --no-faiss --no-sklearn --naive \
  --out "$out/knn.json"
run greedy 90 python3 benchmarks/greedy.py --gpu-size --out "$out/greedy.json"
run score 150 python3 benchmarks/score.py --profile --out "$out/score.json"
run gpu_tests 200 env JAX_PLATFORMS=cuda python3 -m pytest -q -x -p no:cacheprovider tests/models/test_unet_gpu.py \
  tests/models/test_llm_gpu.py tests/models/test_accelerator_attention.py
run decode 40 python3 benchmarks/decode.py --images 512 --out "$out/decode.json"
# Diffusion-DPO train step (issue 10 (b)): SD1.5-sized UNet, B = 8, 64x64 latents, ours against
# PyTorch eager and torch.compile in one run (SD1.5 save/load ~30 s, our compile, torch.compile
# ~3 min); then, in its own process, the largest SDXL batch on one H200 (remat, FSDP off, the
# SDXL recipe's Adafactor; each SDXL compile is minutes, so the search stops starting attempts
# after --sdxl-budget-s). Each writes its JSON after every row, so a cut-short run keeps them.
run train_step 480 python3 benchmarks/train_step.py --out "$out/train_step.json"
run train_step_sdxl 480 python3 benchmarks/train_step.py --sdxl-only --sdxl-batches 2,4 \
  --sdxl-budget-s 330 --out "$out/train_step_sdxl.json"
# Guided DDIM sampling (issue 11): SD1.5-sized UNet, B = 8, 64x64 latents, 77x768 text states,
# 50 steps, guidance 7.5; ours against diffusers' StableDiffusionPipeline (bf16, SDPA) in the
# same run, the denoising loop only (SD1.5 save/load ~30 s, our compile, 6 calls a side).
run sample 300 python3 benchmarks/sample.py --out "$out/sample.json"
