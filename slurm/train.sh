#!/usr/bin/env bash
# Train with ft-train on a SLURM cluster. Hydra overrides pass straight through:
#   sbatch slurm/train.sh experiment=stage1_14b model.pretrained=/weights/Wan2.1-I2V-14B-720P-Diffusers data.shards=/data/latents
#   sbatch --nodes=8 slurm/train.sh experiment=stage1_14b strategy=deepspeed_zero3 ...
# Tasks per node = GPUs per node = trainer.devices (checked at start). The run folder is
# outputs/<job name>-<job id> (or $RUN_ID), so a requeued job finds its own checkpoints and
# resumes; 5 minutes before the time limit SLURM sends USR1, every rank saves, and the job
# requeues itself.
#SBATCH --job-name=ft-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=outputs/slurm/%x-%j.out
set -euo pipefail

export PYTHONFAULTHANDLER=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export FT_RUN_ID=${RUN_ID:-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
FT_TRAIN=${FT_TRAIN:-ft-train}

echo "[slurm/train.sh] job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: run ${FT_RUN_ID}"
# The batch script exits with srun's status, so a failed run is reported as FAILED.
srun --kill-on-bad-exit=1 "$FT_TRAIN" \
    trainer.num_nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}" \
    trainer.devices="${SLURM_NTASKS_PER_NODE}" \
    "$@"
