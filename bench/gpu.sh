#!/usr/bin/env bash
# The GPU check, for a CUDA machine (H100 class), in under 5 minutes: CUDA and the device, the bf16 matmul peak,
# ResNet18 x 2 training on a CREMA-D-shaped set at batch 256 (bf16 autocast + channels_last, + cudnn.benchmark,
# the lineage's fp32 NCHW, torch.compile) with samples/s, step time, achieved TFLOP/s against the peak and peak
# memory, the LB overhead ratio, and the loader / model ratio. Everything is in bench/gpu_check.py; a CPU dry run of
# every path: python bench/gpu_check.py --device cpu --tiny (add --compile on for the compile path).
#
#   bench/gpu.sh                    # all sections, ~4.5 minutes
#   bench/gpu.sh --compile off      # without the torch.compile section (~2.5 minutes)
#   PYTHON=/path/to/python bench/gpu.sh --budget 200
#
# Needs a Python with torch (CUDA), torchvision, numpy, PyYAML and scikit-learn: the repo's .venv when it exists,
# else python3. No registry, MLflow, librosa or network: the data is generated on the spot in a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
home=$(mktemp -d "${TMPDIR:-/tmp}/dmgl-gpu-check-XXXXXX")
trap 'rm -rf "$home"' EXIT
export DMGL_HOME="$home" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
fi
"$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else f"CUDA is not available to {sys.executable} (torch {torch.__version__})")'
# 290 s for the Python part (its own budget is 270 s: sections that would not fit are skipped, not cut)
timeout --signal=INT 290 "$py" bench/gpu_check.py "$@"
