#!/usr/bin/env bash
# Launch `tmem-rl train` with an Accelerate config.
#   launch/train.sh RECIPE [ACCELERATE_CONFIG] [key=value ...]
# ACCELERATE_CONFIG defaults to one process on this machine; e.g. launch/accelerate_cpu_2proc.yaml.
# PYTHON: the interpreter to use (default: the repository's .venv, else python3 on the PATH).
# MAX_RESTARTS (default 3): with several processes, the elastic agent restarts the whole job this many times when a
# process dies or a collective times out, and every start runs `--resume auto`: it continues the run from its last
# checkpoint (docs/launching.md: when a node dies).
set -euo pipefail
recipe=${1:?usage: launch/train.sh RECIPE [ACCELERATE_CONFIG] [key=value ...]}
shift
config=""
if [[ $# -gt 0 && "$1" == *.yaml ]]; then config=$1; shift; fi
here="$(cd "$(dirname "$0")/.." && pwd)"
# The Python that has tmem_rl: $PYTHON, else the repository's .venv (make install), else the one on the PATH.
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then python="$here/.venv/bin/python"; else python="$(command -v python3 || true)"; fi
fi
if ! "$python" -c "import tmem_rl" 2>/dev/null; then
  echo "launch/train.sh: error: ${python:-python3} cannot import tmem_rl; run 'make install' in $here or set PYTHON=/path/to/python" >&2
  exit 2
fi
restarts=${MAX_RESTARTS:-3}
# A restarted job must continue the run, not start it again: --resume auto, unless the command says otherwise.
# (${resume[@]+...} below: an empty array under set -u is an error in bash before 4.4.)
resume=(--resume auto)
for arg in "$@"; do
  case "$arg" in
    --resume|--resume=*) resume=() ;;
    --overwrite)
      if [[ -n "$config" && "$restarts" != 0 ]]; then
        echo "launch/train.sh: error: --overwrite with MAX_RESTARTS=$restarts would delete the run again at every restart; delete the output_dir yourself, or set MAX_RESTARTS=0" >&2
        exit 2
      fi
      resume=() ;;
  esac
done
if [[ -n "$config" ]] && grep -q '^distributed_type: *MULTI_CPU' "$config"; then
  # Accelerate's launcher runs multi-CPU jobs only through MPI; torchrun starts the gloo processes itself, under
  # its elastic agent (a c10d rendezvous on this machine) so that it can restart them.
  nproc=$(sed -n 's/^num_processes: *\([0-9]*\).*/\1/p' "$config")
  exec "$python" -m torch.distributed.run --nproc_per_node "${nproc:-2}" --max-restarts "$restarts" \
    --rdzv-backend c10d --rdzv-endpoint "localhost:${MASTER_PORT:-29500}" \
    -m tmem_rl.cli train "$recipe" ${resume[@]+"${resume[@]}"} "$@"
fi
if [[ -n "$config" ]]; then
  exec "$python" -m accelerate.commands.launch --config_file "$config" --max_restarts "$restarts" \
    -m tmem_rl.cli train "$recipe" ${resume[@]+"${resume[@]}"} "$@"
fi
exec "$python" -m tmem_rl.cli train "$recipe" "$@"
