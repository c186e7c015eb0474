#!/usr/bin/env bash
# One node's share of a job (PALU_LAUNCHER=deepspeed or torchrun): start the node-local launcher for this node's
# ranks, pass SIGUSR1/SIGTERM on to those ranks (they checkpoint at the end of the current step and exit 143), and
# exit with the launcher's status. Started by slurm/common.sh: directly on a single node, through
# `srun --ntasks-per-node=1` on several (SLURM_NODEID is then this node's index in the hostfile).
#   node_launch.sh SCRIPT ARGS...      (environment: see slurm/common.sh)
set -uo pipefail
script=$1
node_rank=${SLURM_NODEID:-0}
read -r -a extra <<< "${PALU_LAUNCHER_ARGS:-}"
if [ "$PALU_LAUNCHER" = deepspeed ]; then
    # --no_ssh: this node's launcher only starts this node's ranks; the hostfile gives every node the same world
    cmd=("$PALU_PYTHON" -u -m deepspeed.launcher.runner --hostfile "$PALU_HOSTFILE" --no_ssh --node_rank "$node_rank"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" ${extra[@]+"${extra[@]}"} "$@")
else
    cmd=("$PALU_PYTHON" -u -m torch.distributed.run --nnodes "$PALU_NNODES" --nproc-per-node "$PALU_SLOTS_PER_NODE"
         --node-rank "$node_rank" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
         ${extra[@]+"${extra[@]}"} "$@")
fi

# The ranks: descendants of the launcher whose command line names the script and that are not launchers themselves
# (deepspeed.launcher.* / torch.distributed.run name it too, as an argument). None yet (the launcher is still
# starting them): retry for a minute rather than signal a launcher, whose default action on SIGUSR1 is to die.
rank_pids() {
    ps -eo pid=,ppid=,args= | awk -v root="$1" -v script="$script" '
        { pid = $1; parent[pid] = $2; $1 = ""; $2 = ""
          if (index($0, script) && !index($0, "deepspeed.launcher") && !index($0, "torch.distributed.run") &&
              !index($0, "torchrun")) named[pid] = 1 }
        END {
            for (p in named) {
                q = parent[p]
                while (q in parent && q > 1) { if (q == root) { print p; break } q = parent[q] }
            }
        }'
}

forward() {
    local pids= i
    for i in $(seq 30); do
        pids=$(rank_pids "$child")
        [ -n "$pids" ] && break
        kill -0 "$child" 2>/dev/null || return 0
        sleep 2
    done
    echo "[palu-slurm node $node_rank] SIG$1: SIGUSR1 to ranks ${pids//$'\n'/ }" >&2
    [ -n "$pids" ] && kill -USR1 $pids 2>/dev/null
}

child=
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# The launcher ignores SIGUSR1 and SIGTERM, which reach it too (SLURM signals every process of a job on requeue,
# and srun passes signals to the whole process group of each task): it must outlive its ranks while they finish the
# step and checkpoint. deepspeed's node launcher (launch.py) and torchrun install their own SIGTERM handler: they
# pass it on to the ranks and wait for them (up to 30 s). The ranks start with SIGUSR1 ignored until the trainer
# installs its handler.
( trap '' TERM USR1; exec "${cmd[@]}" ) &
child=$!
while :; do
    wait "$child"; rc=$?
    if [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; then continue; fi
    break
done
exit "$rc"
