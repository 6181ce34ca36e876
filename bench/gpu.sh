#!/usr/bin/env bash
# The GPU check, for a CUDA machine (H100 class), in under 5 minutes: CUDA and the device, the bf16 matmul peak,
# ResNet18 x 2 training on a CREMA-D-shaped set at batch 256 (bf16 autocast + channels_last, + cudnn.benchmark,
# the lineage's fp32 NCHW, torch.compile) with samples/s, step time, achieved TFLOP/s against the peak and peak
# memory, the LB overhead ratio, and the loader / model ratio. Everything is in bench/gpu_check.py; a CPU dry run of
# every path: python bench/gpu_check.py --device cpu --tiny (add --compile on for the compile path).
#
# With more than one GPU it then trains data-parallel over all of them (bench/ddp.py: `dmgl train --nproc N` against 1
# process on a wide-MLP synthetic run) and prints the scaling efficiency, samples/s at N / (N x samples/s at 1).
#
#   bench/gpu.sh                    # all sections, ~4.5 minutes (+ ~3 with several GPUs)
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
gpus=$("$py" -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -gt 1 ]; then
  timeout --signal=INT 240 "$py" bench/ddp.py --device cuda --strategies concat,lb --epochs 3 --batch-size 1024 \
    --set model.encoders.default.hidden=4096 --set model.encoders.default.layers=3
else
  echo "ddp: 1 GPU visible; the data-parallel scaling section needs 2 or more"
fi
