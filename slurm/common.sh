# shellcheck shell=bash
# slurm/common.sh -- sourced by slurm/{train,precompute,eval}.sbatch: everything between SLURM and launch/*.py.
#
#   palu_init            read the allocation: hosts (scontrol show hostnames), ranks per node, master address/port,
#                        DeepSpeed hostfile on shared storage, device (GPU/NCCL or CPU/gloo), python, output dirs
#   palu_run SCRIPT ARG  start SCRIPT on every rank through $PALU_LAUNCHER, forward preemption signals to the ranks,
#                        wait, and requeue the job when it was stopped for its time limit
#
# Settings -- environment variables, exported before `sbatch` (sbatch passes the environment on) or given as
# `sbatch --export=ALL,PALU_LAUNCHER=torchrun ...`:
#   PALU_REPO           repository checkout, visible on every node (default: $SLURM_SUBMIT_DIR: submit from the root)
#   PALU_PYTHON         interpreter with palu_ds installed (default: $PALU_REPO/.venv/bin/python, else python3)
#   PALU_LAUNCHER       deepspeed (default) | torchrun | srun | mpirun
#   PALU_DEVICE         gpu | cpu (default: gpu when SLURM gave the job GPUs, else cpu)
#   PALU_SHARED         shared-storage root for runs (default: $PALU_REPO/runs)
#   PALU_OUTPUT_DIR     this run's output: checkpoints/, model/, summary.json (default:
#                       $PALU_SHARED/<job name>-<job id>, the same after a requeue, so the job resumes from its latest
#                       complete checkpoint)
#   PALU_TB_DIR         TensorBoard event dir (default: $PALU_OUTPUT_DIR/tensorboard)
#   PALU_DS_CONFIG      DeepSpeed config (default: ds_configs/zero3.json on GPU, ds_configs/cpu/zero2.json on CPU)
#   PALU_SLOTS_PER_NODE ranks per node (default: GPUs per node on GPU, tasks per node on CPU)
#   PALU_MASTER_ADDR    rendezvous host (default: the first host of the allocation)
#   PALU_MASTER_PORT    rendezvous port (default: 20000 + job id % 20000)
#   PALU_LAUNCHER_ARGS  extra arguments for the launcher (deepspeed / torchrun / srun / mpirun), word-split
#   PALU_SRUN_PER_NODE  1: start the per-node launcher through srun even on one node (the multi-node path)
# NCCL/gloo: set NCCL_SOCKET_IFNAME / NCCL_IB_HCA / GLOO_SOCKET_IFNAME etc. as your cluster needs; they are passed on.

palu_log() { printf '[palu-slurm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
palu_die() { palu_log "error: $*"; exit 2; }

palu_init() {
    [ -n "${SLURM_JOB_ID:-}" ] || palu_die "not inside a SLURM job (submit with sbatch)"
    PALU_REPO=${PALU_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [ -f "$PALU_REPO/launch/train.py" ] || palu_die "PALU_REPO=$PALU_REPO is not the palu_ds checkout: submit from the \
repository root or export PALU_REPO"
    cd "$PALU_REPO" || palu_die "cannot cd to $PALU_REPO"
    if [ -z "${PALU_PYTHON:-}" ]; then
        PALU_PYTHON=python3
        [ -x "$PALU_REPO/.venv/bin/python" ] && PALU_PYTHON=$PALU_REPO/.venv/bin/python
    fi
    PALU_LAUNCHER=${PALU_LAUNCHER:-deepspeed}
    case $PALU_LAUNCHER in deepspeed|torchrun|srun|mpirun) ;; *) palu_die "PALU_LAUNCHER=$PALU_LAUNCHER: use \
deepspeed, torchrun, srun or mpirun";; esac

    # device: GPUs with NCCL, or CPU with gloo (DeepSpeed's CPU accelerator). GPUs on this node: SLURM's count,
    # else the length of CUDA_VISIBLE_DEVICES (--gres=gpu:N on older SLURMs)
    local gpus=${SLURM_GPUS_ON_NODE:-0}
    if [ "$gpus" = 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != NoDevFiles ]; then
        gpus=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
    fi
    if [ -z "${PALU_DEVICE:-}" ]; then
        if [ "$gpus" != 0 ]; then PALU_DEVICE=gpu; else PALU_DEVICE=cpu; fi
    fi
    if [ "$PALU_DEVICE" = cpu ]; then
        export DS_ACCELERATOR=cpu
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
        PALU_DS_CONFIG=${PALU_DS_CONFIG:-ds_configs/cpu/zero2.json}
    else
        PALU_DS_CONFIG=${PALU_DS_CONFIG:-ds_configs/zero3.json}
    fi

    # hosts of the allocation, in SLURM's order; rank 0 (the master) lives on the first
    if command -v scontrol >/dev/null 2>&1; then
        mapfile -t PALU_HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    else
        mapfile -t PALU_HOSTS < <("$PALU_PYTHON" -m palu_ds.cluster expand "$SLURM_JOB_NODELIST")
    fi
    [ "${#PALU_HOSTS[@]}" -gt 0 ] || palu_die "no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    PALU_NNODES=${#PALU_HOSTS[@]}
    if [ -z "${PALU_SLOTS_PER_NODE:-}" ]; then
        if [ "$PALU_DEVICE" = gpu ]; then
            [ "$gpus" != 0 ] || palu_die "PALU_DEVICE=gpu but the job has no GPUs: use --gpus-per-node"
            PALU_SLOTS_PER_NODE=$gpus
        else  # SLURM_TASKS_PER_NODE looks like 2(x4): the first count
            PALU_SLOTS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%[(,]*}}
        fi
    fi
    PALU_WORLD=$((PALU_NNODES * PALU_SLOTS_PER_NODE))
    export MASTER_ADDR=${PALU_MASTER_ADDR:-${PALU_HOSTS[0]}}
    export MASTER_PORT=${PALU_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

    PALU_SHARED=${PALU_SHARED:-$PALU_REPO/runs}
    PALU_JOB_DIR=$PALU_SHARED/.slurm/$SLURM_JOB_ID  # on shared storage: every node reads the hostfile
    mkdir -p "$PALU_JOB_DIR" || palu_die "cannot create $PALU_JOB_DIR"
    PALU_HOSTFILE=$PALU_JOB_DIR/hostfile
    : > "$PALU_HOSTFILE.tmp"
    for h in "${PALU_HOSTS[@]}"; do echo "$h slots=$PALU_SLOTS_PER_NODE" >> "$PALU_HOSTFILE.tmp"; done
    mv -f "$PALU_HOSTFILE.tmp" "$PALU_HOSTFILE"

    export PALU_REPO PALU_PYTHON PALU_LAUNCHER PALU_DEVICE PALU_DS_CONFIG PALU_NNODES PALU_SLOTS_PER_NODE PALU_WORLD \
        PALU_SHARED PALU_JOB_DIR PALU_HOSTFILE
    export PYTHONUNBUFFERED=1
    palu_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $PALU_NNODES node(s) x $PALU_SLOTS_PER_NODE \
rank(s) = $PALU_WORLD on $PALU_DEVICE via $PALU_LAUNCHER; master $MASTER_ADDR:$MASTER_PORT; hostfile $PALU_HOSTFILE: \
$(tr '\n' ' ' < "$PALU_HOSTFILE")"
}

# The command that starts SCRIPT on all ranks, as the array PALU_CMD.
palu_command() {
    local extra=()
    read -r -a extra <<< "${PALU_LAUNCHER_ARGS:-}"
    case $PALU_LAUNCHER in
        deepspeed|torchrun)  # one node-local launcher per node (no ssh: SLURM starts them)
            if [ "$PALU_NNODES" -gt 1 ] || [ "${PALU_SRUN_PER_NODE:-0}" = 1 ]; then
                PALU_CMD=(srun --nodes="$PALU_NNODES" --ntasks="$PALU_NNODES" --ntasks-per-node=1
                          --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 --wait=60)
                [ "$PALU_DEVICE" = gpu ] && PALU_CMD+=(--gpus-per-node="$PALU_SLOTS_PER_NODE")
                PALU_CMD+=(bash "$PALU_REPO/slurm/node_launch.sh" "$@")
            else
                PALU_CMD=(bash "$PALU_REPO/slurm/node_launch.sh" "$@")
            fi ;;
        srun)  # one SLURM task per rank; slurm/task.sh maps SLURM_PROCID/NTASKS/LOCALID to RANK/WORLD_SIZE/LOCAL_RANK
            PALU_CMD=(srun --ntasks="$PALU_WORLD" --ntasks-per-node="$PALU_SLOTS_PER_NODE"
                      --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 --wait=60
                      ${extra[@]+"${extra[@]}"} bash "$PALU_REPO/slurm/task.sh" "$PALU_PYTHON" -u "$@") ;;
        mpirun)  # OpenMPI: ranks from OMPI_COMM_WORLD_*; mpirun forwards SIGUSR1 to every rank and, on SIGTERM,
                 # gives them odls_base_sigkill_timeout seconds (default 1) to checkpoint before SIGKILL
            PALU_CMD=(mpirun -np "$PALU_WORLD" --hostfile "$PALU_HOSTFILE" --map-by "ppr:$PALU_SLOTS_PER_NODE:node"
                      --bind-to none --mca odls_base_sigkill_timeout 30
                      -x MASTER_ADDR -x MASTER_PORT -x PATH -x PYTHONUNBUFFERED)
            local v
            for v in DS_ACCELERATOR OMP_NUM_THREADS PYTHONPATH LD_LIBRARY_PATH LD_PRELOAD HF_HOME HF_HUB_OFFLINE \
                     TORCH_EXTENSIONS_DIR GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do  # LD_PRELOAD: e.g. jemalloc
                [ -n "${!v:-}" ] && PALU_CMD+=(-x "$v")
            done
            [ "$(id -u)" = 0 ] && PALU_CMD+=(--allow-run-as-root)
            PALU_CMD+=(${extra[@]+"${extra[@]}"} "$PALU_PYTHON" -u "$@") ;;
    esac
}

_palu_signal() {  # trap: remember the signal, pass SIGUSR1 on to the ranks (they checkpoint at the end of the step)
    PALU_GOT_SIGNAL=$1
    palu_log "received SIG$1: asking the ranks to checkpoint and stop"
    [ -n "${PALU_CHILD:-}" ] && kill -USR1 "$PALU_CHILD" 2>/dev/null
}

# palu_run SCRIPT ARGS...: returns the launcher's exit status (143 = stopped after a preemption checkpoint).
palu_run() {
    palu_command "$@"
    palu_log "launch: ${PALU_CMD[*]}"
    PALU_GOT_SIGNAL=
    trap '_palu_signal USR1' USR1   # sbatch --signal=B:USR1@SECONDS: the time limit is near
    trap '_palu_signal TERM' TERM   # scontrol requeue, preemption, scancel: SLURM also signals the ranks directly
    "${PALU_CMD[@]}" &
    PALU_CHILD=$!
    local rc
    while :; do
        wait "$PALU_CHILD"; rc=$?
        if [ "$rc" -gt 128 ] && kill -0 "$PALU_CHILD" 2>/dev/null; then continue; fi  # a trap interrupted wait
        break
    done
    PALU_CHILD=
    trap - USR1 TERM
    palu_log "launcher exited with status $rc"
    if [ "$PALU_GOT_SIGNAL" = USR1 ] && [ "$rc" != 0 ] && [ "${PALU_REQUEUE_ON_TIMEOUT:-1}" = 1 ]; then
        palu_log "requeueing job $SLURM_JOB_ID: it resumes from the checkpoint just written"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
