#!/usr/bin/env bash
# Two "nodes" on one machine over loopback, on the CPU (gloo): what a 2-node job does, runnable
# anywhere. Each node is its own `accelerate launch` with its own machine rank, exactly as on a
# cluster; the tests use it.
#   launch/two_nodes_local.sh [PROCS_PER_NODE=1] [distgan train arguments ...]
# e.g. launch/two_nodes_local.sh 1 --out runs/2nodes train.steps=200
# Exits with the first non-zero status of the two nodes (0 if both succeed).
set -euo pipefail
per_node=${1:-1}
shift || true
port=${MAIN_PROCESS_PORT:-$((29500 + RANDOM % 1000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
node() {
    accelerate launch --multi_gpu --num_machines 2 --machine_rank "$1" --num_processes $((2 * per_node)) \
        --main_process_ip 127.0.0.1 --main_process_port "$port" --rdzv_backend static --same_network \
        --mixed_precision no --dynamo_backend no -m distgan train "${@:2}"
}
node 0 "$@" &
pid0=$!
node 1 "$@" > >(sed 's/^/[node 1] /') 2> >(sed 's/^/[node 1] /' >&2) &
pid1=$!
trap 'kill -TERM $pid0 $pid1 2>/dev/null || true' INT TERM
status0=0; status1=0
wait $pid0 || status0=$?
wait $pid1 || status1=$?
if [[ $status0 != 0 ]]; then exit $status0; fi
exit $status1
