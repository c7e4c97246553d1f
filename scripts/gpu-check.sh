#!/usr/bin/env bash
# The checks that need a CUDA device, in one go: the gpu-marked tests (CUDA parity, per-model RNG
# on CUDA, metrics, nccl in a torchrun group of one) and the GPU benchmark (bench/gpu.py).
#
#   scripts/gpu-check.sh [OUT_DIR]
#
# Runs in a checkout on a machine with an NVIDIA GPU and a CUDA build of torch already installed
# (the server's other dependencies are installed here; WHEELS=DIR installs them from a folder of
# wheels, for a machine without a package index). Every step runs even when one before failed;
# the exit status is the number of failed steps. Results: OUT_DIR (default bench/out/gpu):
# tests.log, bench.json, bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/out/gpu}"
mkdir -p "$out"
failed=0
step() { echo "== $*"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || failed=$((failed + 1))
python -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda",
torch.version.cuda, "devices", torch.cuda.device_count()); sys.exit(not torch.cuda.is_available())' \
    || { echo "no CUDA device: nothing to check"; exit 1; }

step "install (torch as it is)"
pip_args=(--quiet)
[ -n "${WHEELS:-}" ] && pip_args+=(--no-index --find-links "$WHEELS")
pip install "${pip_args[@]}" grpcio grpcio-health-checking grpcio-reflection protobuf \
    prometheus-client numpy pytest pytest-timeout hypothesis safetensors pyyaml \
    && pip install --quiet --no-deps --no-build-isolation -e . || failed=$((failed + 1))

step "gpu tests"
python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_model_rng.py \
    tests/test_metrics.py tests/test_fast_paths.py tests/test_distributed.py 2>&1 | tee "$out/tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))

step "benchmark"
python bench/gpu.py --json "$out/bench.json" 2>&1 | tee "$out/bench.log" | tail -20
[ "${PIPESTATUS[0]}" -eq 0 ] || failed=$((failed + 1))

step "done: $failed failed step(s)"
exit "$failed"
