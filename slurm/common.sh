# shellcheck shell=bash
# Sourced by slurm/*.sbatch: settings, the multi-node `accelerate launch` and preemption handling.
# Adapted from: open-muse training/imagenet_movq_ds.slurm (one launcher task per node, head node from the
# nodelist), minus its undefined variables. See docs/CLUSTER.md.
#
# Settings: export before `sbatch` / `slurm/pipeline.sh` (sbatch passes the environment on), or
# `sbatch --export=ALL,VAR=value ...`. Cluster placement is given as sbatch flags, never edited into the scripts:
#   PARTITION     -> sbatch -p/--partition  (slurm/pipeline.sh adds it when set)
#   ACCOUNT       -> sbatch -A/--account    (slurm/pipeline.sh adds it when set)
#   NODES         -> sbatch -N/--nodes      (default in each script: 1; pipeline.sh: $NODES)
#   GPUS_PER_NODE -> sbatch --gpus-per-node (pipeline.sh adds it when > 0) and the processes per node
set -euo pipefail

: "${VQGEN_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"            # the vqgen checkout (scripts, accelerate_configs/)
: "${VENV:=$VQGEN_ROOT/.venv}"                           # virtual environment with vqgen installed
: "${PYTHON:=$VENV/bin/python}"
: "${ACCELERATE:=$(dirname "$PYTHON")/accelerate}"
: "${ACCELERATE_CONFIG:=$VQGEN_ROOT/accelerate_configs/multi_node.yaml}"
: "${GPUS_PER_NODE:=8}"
: "${PROCS_PER_NODE:=$GPUS_PER_NODE}"                    # processes per node (CPU tests: 1 or 2)
: "${ACCELERATE_EXTRA:=}"                                # extra launcher flags, e.g. "--mixed_precision no"
: "${RDZV_BACKEND:=c10d}"                                # static for fake nodes sharing one host (docs/CLUSTER.md)
: "${DATASET:=mnist}"
: "${RUN_DIR:=$VQGEN_ROOT/runs/$DATASET}"                # <RUN_DIR>/{vqvae,shards,prior}
: "${HEAD_ADDR:=}"                                       # default: first host of the allocation
: "${MAIN_PORT:=}"                                       # default: a free port derived from the job id
: "${PREEMPT_REQUEUE:=1}"                                # 0: on USR1 stop cleanly but do not requeue
export PYTHONUNBUFFERED=1

NNODES=${SLURM_NNODES:-1}
if [ "${PROCS_PER_NODE}" -lt 1 ]; then PROCS_PER_NODE=1; fi
NUM_PROCESSES=$((NNODES * PROCS_PER_NODE))
if [ -z "$HEAD_ADDR" ]; then
    HEAD_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n1)
fi
if [ -z "$MAIN_PORT" ]; then
    # Derived from the job id (two jobs sharing a node differ), then the first free one from there. The batch
    # shell runs on the first node of the allocation, i.e. the head node, so the check is made where it matters.
    MAIN_PORT=$("$PYTHON" - "${SLURM_JOB_ID:-0}" <<'PY'
import socket, sys
port = 20000 + int(sys.argv[1]) % 20000
for p in list(range(port, 40000)) + list(range(20000, port)):
    with socket.socket() as s:
        try:
            s.bind(("", p))
        except OSError:
            continue
        print(p)
        break
PY
)
fi
export VQGEN_ROOT PYTHON ACCELERATE ACCELERATE_CONFIG NUM_PROCESSES HEAD_ADDR MAIN_PORT RDZV_BACKEND ACCELERATE_EXTRA

echo "[vqgen] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}: $NNODES node(s) x" \
     "$PROCS_PER_NODE process(es), head $HEAD_ADDR:$MAIN_PORT, rdzv $RDZV_BACKEND, config $ACCELERATE_CONFIG"

# ---------------------------------------------------------------------------------------------- preemption
# `#SBATCH --signal=B:USR1@180` sends USR1 to this shell (only) 180 s before the time limit; `scancel --signal=USR1
# --batch <job>` does the same by hand. Training stages (STOP_MODE=file): create the run's stop file; the loop sees
# it at the next step on every rank (one all-reduce), saves a checkpoint and exits 0; then requeue, and the
# requeued job continues with --resume latest. Extraction (STOP_MODE=signal): stop srun; complete shards are kept
# and a rerun redoes only the rest. TERM (scancel, or Slurm preemption with PreemptMode=REQUEUE, which requeues
# by itself): same clean stop, no requeue by us (a cancelled job must stay cancelled).
STOP_MODE=file
STOP_FILE=
SRUN_PID=
PREEMPTED=

_vqgen_stop() {
    PREEMPTED=$1
    echo "[vqgen] SIG$1 received at $(date +%T): stopping ($STOP_MODE)"
    if [ "$STOP_MODE" = file ] && [ -n "$STOP_FILE" ]; then
        mkdir -p "$(dirname "$STOP_FILE")" && touch "$STOP_FILE"
    elif [ -n "$SRUN_PID" ]; then
        kill -TERM "$SRUN_PID" 2>/dev/null || true
    fi
}
trap '_vqgen_stop USR1' USR1
trap '_vqgen_stop TERM' TERM

# vqgen_launch STOP_FILE SCRIPT.py ARGS...: one `accelerate launch` per node under srun, wait for it (a trapped
# signal interrupts `wait`, hence the loop), requeue the job if it was stopped by USR1 before finishing.
vqgen_launch() {
    STOP_FILE=$1
    shift
    if [ -n "$STOP_FILE" ]; then STOP_MODE=file; rm -f "$STOP_FILE"; else STOP_MODE=signal; fi
    # shellcheck disable=SC2016  # $SLURM_NODEID etc. expand in each task, not here
    srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 bash -c '
        exec "$ACCELERATE" launch --config_file "$ACCELERATE_CONFIG" --num_machines "$SLURM_NNODES" \
            --num_processes "$NUM_PROCESSES" --machine_rank "$SLURM_NODEID" --main_process_ip "$HEAD_ADDR" \
            --main_process_port "$MAIN_PORT" --rdzv_backend "$RDZV_BACKEND" $ACCELERATE_EXTRA "$@"' vqgen-node "$@" &
    SRUN_PID=$!
    local rc
    while :; do
        rc=0
        wait "$SRUN_PID" || rc=$?
        kill -0 "$SRUN_PID" 2>/dev/null || break
    done
    SRUN_PID=
    echo "[vqgen] srun exited with $rc"
    if [ "$PREEMPTED" = USR1 ]; then
        local stopped_early=0
        if [ "$STOP_MODE" = file ]; then
            # the loop deletes the stop file when it acts on it; still there = it finished (or failed) first
            if [ -e "$STOP_FILE" ]; then rm -f "$STOP_FILE"; elif [ "$rc" = 0 ]; then stopped_early=1; fi
        elif [ "$rc" != 0 ]; then
            stopped_early=1
        fi
        if [ "$stopped_early" = 1 ] && [ "$PREEMPT_REQUEUE" = 1 ]; then
            echo "[vqgen] requeueing job $SLURM_JOB_ID; it will resume from the last checkpoint"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
    fi
    return "$rc"
}
