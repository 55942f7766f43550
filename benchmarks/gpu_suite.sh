#!/usr/bin/env bash
# One-shot GPU suite, for a machine with one GPU (about 8 minutes on an H100/H200):
#   1. every Triton kernel against its float64 reference on CUDA, forward and backward (gpu_check.py);
#   2. bench_minibatch_l1.py;
#   3. bench_spectral_norm.py (profiler launch counts, the custom ops vs Inductor under compile, the
#      roofline table and its PNG);
#   4. trainer steps/s of digits-dcgan, digits-sngan and photos-biggan-64, compile off and on (gpu_steps.py);
#   5. the gradient-penalty modes' step cost (penalty_cost.py): exact eager, approx and lazy eager and
#      compiled, on r3gan-256;
#   6. R3GAN's block with its grouped conv native and block-diagonal, per stage shape (grouped_conv.py);
#   7. digits-dcgan and digits-sngan steps under torch.cuda.set_sync_debug_mode("error") (gpu_steps.py
#      --sync-check): a step that makes the host wait for the GPU fails the suite.
# Everything lands in benchmarks/results/*-gpu-<name>.{json,md,png} (DISTGAN_BENCH_RESULTS overrides).
#
#   bash benchmarks/gpu_suite.sh            the real suite (needs CUDA)
#   bash benchmarks/gpu_suite.sh --dry-run  the same code paths at toy sizes on the CPU (the tests run it)
#
# PYTHON defaults to .venv/bin/python when it exists, else python3. The distgan trainer needs
# webdataset and wandb importable besides torch, triton and accelerate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DRY=()
if [ "${1:-}" = "--dry-run" ]; then
  DRY=(--dry-run)
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
elif ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_suite.sh: no CUDA device; use --dry-run to exercise it on the CPU" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $*" >&2; local t0=$SECONDS; "$@" || status=1; echo "== $(( SECONDS - t0 )) s" >&2; }

step "$PYTHON" benchmarks/gpu_check.py "${DRY[@]}"
if [ ${#DRY[@]} -gt 0 ]; then
  # the interpreter would time nothing meaningful: the fallback and chunked paths only, at toy sizes
  unset TRITON_INTERPRET
  step "$PYTHON" benchmarks/bench_minibatch_l1.py --sizes 64 --repeats 1 --impls chunked
  step "$PYTHON" benchmarks/bench_spectral_norm.py --workloads dcgan --repeats 2 --roofline-sizes 128 256 \
    --impls none torch ours-fallback ours-fallback-out
  step "$PYTHON" benchmarks/gpu_steps.py --dry-run --presets digits-sngan
  step "$PYTHON" benchmarks/gpu_steps.py --dry-run --presets digits-gat --modes eager --name gat_b2_steps \
    --set model.vit.width=16 model.vit.depth=2 model.vit.heads=2 model.vit.levels=2 model.vit.patch=1
  step "$PYTHON" benchmarks/penalty_cost.py --presets grid-r3gan --rounds 1 --intervals 1 --modes "lazy compiled"
  step "$PYTHON" benchmarks/grouped_conv.py --shapes cifar-4 --repeats 1 --batch 1
  step "$PYTHON" benchmarks/gpu_steps.py --sync-check --presets digits-sngan
else
  step "$PYTHON" benchmarks/bench_minibatch_l1.py --sizes 256 1024 4096 --repeats 5 --timeout 240
  step "$PYTHON" benchmarks/bench_spectral_norm.py --repeats 20
  step "$PYTHON" benchmarks/gpu_steps.py --steps 300
  # GAT-B/2's transformers (width 768, depth 12, 256 tokens: patch 1 on the 16 px digits), its recipe, bf16
  step "$PYTHON" benchmarks/gpu_steps.py --presets digits-gat --modes eager compile --steps 120 --name gat_b2_steps \
    --set model.vit.size=B model.vit.patch=1 model.vit.cmap=2048 train.lr_ref_width=768 data.batch_size=128 variant.n_critic=1 \
    train.mixed_precision=bf16
  step "$PYTHON" benchmarks/penalty_cost.py --presets r3gan-256 --rounds 1 --intervals 3
  step "$PYTHON" benchmarks/grouped_conv.py --batch 32 --repeats 10
  step "$PYTHON" benchmarks/gpu_steps.py --sync-check --presets digits-dcgan digits-sngan
fi
exit $status
