#!/usr/bin/env bash
# Run an experiment on several GPU nodes of a SLURM cluster: one task per node, each with all of
# its node's GPUs; the mesh spans every GPU of every node.
#
#   launch/slurm.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P] [--account A]
#       [--time HH:MM:SS] [--job-name NAME] CONFIG WORKDIR [--config.key=value ...]
#
# Writes an sbatch job and submits it (`--dry-run`: prints the job, submits nothing). The job
# installs fifa_jax with the CUDA extra into ./.venv-gpu (as launch/gpu.sh does: again when
# setup.py changed or an install did not finish), then `srun` starts one
# `python -m fifa_jax.main ... --config.mesh.distributed=auto` per node. fifa_jax.parallel sees
# SLURM_NTASKS > 1 and calls jax.distributed.initialize(), which reads the coordinator (the
# first node of SLURM_STEP_NODELIST), the process count and id from SLURM's variables.
# JAX_LOCAL_DEVICE_IDS=0,...,G-1 keeps all G GPUs in each task (JAX's SLURM detection alone
# assumes one task per GPU and would give each task GPU SLURM_LOCALID only).
# The repository, WORKDIR (no whitespace: it is in an #SBATCH line) and the data must be on a
# file system every node sees at the same path. SLURM sends SIGTERM 120 s before the time
# limit: the running stage saves and exits, and submitting the same command again resumes
# (finished stages are skipped). The job's log is WORKDIR/slurm-<job id>.out.
set -euo pipefail
usage="usage: launch/slurm.sh [--dry-run] [--nodes N] [--gpus-per-node G] [--partition P]"
usage+=" [--account A] [--time T] [--job-name NAME] CONFIG WORKDIR [overrides...]"
dry_run=0 nodes=2 gpus=8 partition="" account="" time_limit="24:00:00" name="fifa_jax"
while [[ $# -gt 0 && $1 == --* && $1 != --config* ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --nodes) nodes=${2:?$usage}; shift 2 ;;
    --gpus-per-node) gpus=${2:?$usage}; shift 2 ;;
    --partition) partition=${2:?$usage}; shift 2 ;;
    --account) account=${2:?$usage}; shift 2 ;;
    --time) time_limit=${2:?$usage}; shift 2 ;;
    --job-name) name=${2:?$usage}; shift 2 ;;
    *) echo "unknown option $1; $usage" >&2; exit 2 ;;
  esac
done
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
for n in "$nodes" "$gpus"; do
  if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
    echo "--nodes and --gpus-per-node take a count >= 1; $usage" >&2; exit 2
  fi
done
repo=$(cd "$(dirname "$0")/.." && pwd)
case $workdir in /*) ;; *) workdir=$PWD/$workdir ;; esac
if [[ $workdir =~ [[:space:]] ]]; then   # it goes into an #SBATCH line, which cannot quote
  echo "WORKDIR must not contain whitespace: $workdir" >&2; exit 2
fi
case $config in /*) ;; *) config=$PWD/${config} ;; esac
config_file=${config%%:*}
[[ -f $config_file ]] || { echo "config file $config_file does not exist" >&2; exit 2; }
device_ids=$(seq -s, 0 $((gpus - 1)))
overrides=$(printf ' %q' "$@")
[[ $# -gt 0 ]] || overrides=""

job=$(cat <<EOF
#!/usr/bin/env bash
#SBATCH --job-name=$name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --exclusive
#SBATCH --time=$time_limit
#SBATCH --signal=TERM@120
#SBATCH --output=$workdir/slurm-%j.out
${partition:+#SBATCH --partition=$partition}
${account:+#SBATCH --account=$account}
set -euo pipefail
cd $(printf %q "$repo")
launch/gpu_venv.sh
export XLA_PYTHON_CLIENT_PREALLOCATE=\${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export JAX_LOCAL_DEVICE_IDS=$device_ids
srun --nodes=$nodes --ntasks-per-node=1 --kill-on-bad-exit=1 \\
  .venv-gpu/bin/python -m fifa_jax.main --config $(printf %q "$config") \\
  --workdir $workdir --config.mesh.distributed=auto$overrides
EOF
)
job=$(grep -v '^$' <<<"$job")
if [[ $dry_run == 1 ]]; then
  printf '%s\n' "$job"
  exit 0
fi
mkdir -p "$workdir"
sbatch <<<"$job"
