#!/usr/bin/env bash
# sbatch --nodes=2 launch/slurm_multinode.sh RECIPE [key=value ...]
# One task per node; each starts 8 GPU processes with Accelerate, rank 0's host as the rendezvous.
# A dead or hung process: the elastic agent restarts the job's processes (MAX_RESTARTS, default 3) and each start
# continues the run from its last checkpoint (--resume auto). A lost node: SLURM requeues the job (--requeue), which
# resumes the same way. docs/launching.md: when a node dies, when a job hangs.
#SBATCH --job-name=tmem-rl
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
recipe=${1:?usage: sbatch --nodes=N launch/slurm_multinode.sh RECIPE [key=value ...]}
shift
# A requeued or restarted job continues the run: --resume auto, unless the command says --resume or --overwrite
# (--overwrite would delete the run again at every restart: refused).
resume="--resume auto"
for arg in "$@"; do
  case "$arg" in
    --resume|--resume=*) resume="" ;;
    --overwrite) echo "slurm_multinode.sh: error: --overwrite would delete the run again at every restart or requeue; delete the output_dir yourself" >&2; exit 2 ;;
  esac
done
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${GPUS_PER_NODE:-8}
srun bash -c "accelerate launch --config_file launch/accelerate_multinode.yaml \
    --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * gpus_per_node)) \
    --machine_rank \$SLURM_NODEID --main_process_ip $head_node --main_process_port 29500 \
    --max_restarts ${MAX_RESTARTS:-3} \
    -m tmem_rl.cli train $recipe $resume $*"
