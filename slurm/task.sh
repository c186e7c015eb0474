#!/usr/bin/env bash
# One SLURM task = one rank (PALU_LAUNCHER=srun): SLURM's task ids become torch.distributed's variables, then the
# task becomes the rank itself (exec), so srun's signal forwarding reaches it directly.
#   srun ... bash slurm/task.sh PYTHON -u SCRIPT ARGS...
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
export LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}
exec "$@"
