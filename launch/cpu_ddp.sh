#!/usr/bin/env bash
# N gloo ranks of `distgan train` on one CPU machine (no GPU needed).
#   launch/cpu_ddp.sh [N=2] [distgan train arguments ...]
# e.g. launch/cpu_ddp.sh 2 --out runs/ddp train.steps=500
# `--multi_gpu` is what makes accelerate start N processes; distgan itself picks the CPU (gloo)
# when no GPU is present. Each rank uses OMP_NUM_THREADS threads (default: cores / N).
set -euo pipefail
n=${1:-2}
shift || true
port=${MAIN_PROCESS_PORT:-$((29500 + RANDOM % 1000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))}
exec accelerate launch --multi_gpu --num_processes "$n" --num_machines 1 --mixed_precision no \
    --dynamo_backend no --main_process_port "$port" -m distgan train "$@"
