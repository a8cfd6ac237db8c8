#!/usr/bin/env bash
# Launch any viq_megatron job on a Slurm cluster, or on this machine without Slurm.
#
#   sbatch slurm/pretrain_viq.sh CONFIG [key.sub=value ...]          # a training stage
#   sbatch slurm/pretrain_viq.sh preprocess --input ... --out ...    # tools/preprocess_images.py
#   sbatch slurm/pretrain_viq.sh evaluate --config ... --checkpoint ... --questions ... --out ...
#   bash   slurm/pretrain_viq.sh CONFIG [key.sub=value ...]          # no Slurm: torchrun here
#
# CONFIG may also come from the environment (CONFIG=... sbatch slurm/pretrain_viq.sh).
# Every stage (stage1, stage2 2-1/2-2, decoder, continuous, discrete) is a config with
# train.stage set. Logs and checkpoints go to runs/<job name>-<job id>/ unless an
# override sets train.output_dir. One task per GPU; MASTER_ADDR/MASTER_PORT come from the
# allocation. Before the time limit Slurm sends SIGUSR1: the job saves a checkpoint and
# exits, and this script requeues it; the requeued job resumes from that checkpoint.
# Without Slurm, NPROC (default: the GPU count, else 2) sets the number of processes.
#
# Edit these defaults for your cluster:
#SBATCH --job-name=viq
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
if [[ -n ${SLURM_SUBMIT_DIR:-} ]]; then cd "$SLURM_SUBMIT_DIR"; else cd "$(dirname "${BASH_SOURCE[0]}")/.."; fi
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}

if [[ ${1:-} == preprocess ]]; then
    shift
    entry=(tools/preprocess_images.py "$@")
    out=""
elif [[ ${1:-} == evaluate ]]; then
    shift
    entry=(-m viq_megatron.evaluate "$@")
    out=""
else
    config=${1:-${CONFIG:-}}
    [[ -n $config ]] || { echo "usage: sbatch slurm/pretrain_viq.sh CONFIG [key.sub=value ...]" >&2; exit 2; }
    [[ $# -gt 0 ]] && shift
    out=runs/${SLURM_JOB_NAME:-viq}-${SLURM_JOB_ID:-local}
    # Later overrides win: a user's train.output_dir=... replaces this default.
    entry=(-m viq_megatron.train --config "$config" "train.output_dir=$out" "$@")
    for arg in "$@"; do [[ $arg == train.output_dir=* ]] && out=${arg#train.output_dir=}; done
fi

if [[ -n ${SLURM_JOB_ID:-} ]]; then
    mkdir -p logs
    export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
    # srun starts one task per GPU; each reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID.
    set +e
    srun --kill-on-bad-exit=1 "$python" "${entry[@]}"
    status=$?
    set -e
    if [[ $status -eq 0 && -n $out && ! -f $out/finished ]]; then
        echo "stopped before the last step (time limit or preemption): requeueing $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit $status
fi

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc=${NPROC:-$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2)}
exec "$python" -m torch.distributed.run --nproc-per-node "$nproc" ${MASTER_PORT:+--master-port "$MASTER_PORT"} \
    "${entry[@]}"
