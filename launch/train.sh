#!/usr/bin/env bash
# Launch `tmem-rl train` with an Accelerate config.
#   launch/train.sh RECIPE [ACCELERATE_CONFIG] [key=value ...]
# ACCELERATE_CONFIG defaults to one process on this machine; e.g. launch/accelerate_cpu_2proc.yaml.
set -euo pipefail
recipe=${1:?usage: launch/train.sh RECIPE [ACCELERATE_CONFIG] [key=value ...]}
shift
config=""
if [[ $# -gt 0 && "$1" == *.yaml ]]; then config=$1; shift; fi
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
if [[ -n "$config" ]] && grep -q '^distributed_type: *MULTI_CPU' "$config"; then
  # Accelerate's launcher runs multi-CPU jobs only through MPI; torchrun starts the gloo processes itself.
  nproc=$(sed -n 's/^num_processes: *\([0-9]*\).*/\1/p' "$config")
  exec "$python" -m torch.distributed.run --nproc_per_node "${nproc:-2}" -m tmem_rl.cli train "$recipe" "$@"
fi
if [[ -n "$config" ]]; then
  exec "$python" -m accelerate.commands.launch --config_file "$config" -m tmem_rl.cli train "$recipe" "$@"
fi
exec "$python" -m tmem_rl.cli train "$recipe" "$@"
