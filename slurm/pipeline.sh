#!/bin/bash
# Submit the three stages as one chain: extract starts after stage 1 succeeded (afterok), the prior after
# extraction succeeded. A stage that is requeued (preemption) keeps its job id, so the chain waits for it.
#   DATASET=imagenet RUN_DIR=$PWD/runs/imagenet NODES=2 GPUS_PER_NODE=8 PARTITION=gpu ACCOUNT=myproj \
#   VQVAE_ARGS="..." EXTRACT_ARGS="..." PRIOR_ARGS="..." slurm/pipeline.sh [extra sbatch flags for all three]
# Prints the three job ids (one line each: stage id). Settings: see slurm/common.sh.
set -euo pipefail
VQGEN_ROOT=${VQGEN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export VQGEN_ROOT
export DATASET=${DATASET:-mnist}
RUN_DIR=$(realpath -m "${RUN_DIR:-$VQGEN_ROOT/runs/$DATASET}")
export RUN_DIR
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
LOG_DIR=${LOG_DIR:-$RUN_DIR/logs}
mkdir -p "$LOG_DIR"

flags=(--parsable --nodes "$NODES" --export ALL --chdir "$VQGEN_ROOT")
[ -n "${PARTITION:-}" ] && flags+=(--partition "$PARTITION")
[ -n "${ACCOUNT:-}" ] && flags+=(--account "$ACCOUNT")
[ "$GPUS_PER_NODE" -gt 0 ] && flags+=(--gpus-per-node "$GPUS_PER_NODE")
flags+=("$@")

submit() {  # submit NAME SCRIPT [dependency]
    local dep=() id
    [ -n "${3:-}" ] && dep=(--dependency "afterok:$3" --kill-on-invalid-dep yes)
    id=$(sbatch "${flags[@]}" "${dep[@]}" --output "$LOG_DIR/$1-%j.out" "$VQGEN_ROOT/slurm/$2")
    echo "${id%%;*}"
}
vq=$(submit vqvae train_vqvae.sbatch)
ex=$(submit extract extract_codes.sbatch "$vq")
pr=$(submit prior train_prior.sbatch "$ex")
echo "vqvae $vq"
echo "extract $ex"
echo "prior $pr"
