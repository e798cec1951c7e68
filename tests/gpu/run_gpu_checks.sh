#!/usr/bin/env bash
# GPU checks of the engine runtime: run on a machine with an NVIDIA GPU, from the repo root.
#   tests/gpu/run_gpu_checks.sh            # pytest -m gpu + GPU benchmark
# Needs: torch with CUDA; for TensorRT tests `pip install tensorrt` (and nvidia-modelopt for
# FP16 and FP8); for ORT CUDA/TensorRT providers `pip install onnxruntime-gpu`. INT8 plans are
# built from the QDQ variant ONNX Runtime runs on CPU. Missing pieces skip with the reason; on
# a CPU-only machine everything skips.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 - <<'PY'
from inference.engines import engine_availability
for name, status in engine_availability().items():
    print(f"{name:12s} {status}")
PY
python3 -m pytest -q -rs -m gpu tests/gpu -p no:cacheprovider
# language models (text encoder, report-decoder step) on TensorRT vs ORT CPU: prints the
# encoder max |diff| and how many greedy generations gave the same tokens (2 = skipped)
python3 -m tests.gpu.language_trt_check || [ $? -eq 2 ]
python3 benchmarks/engines.py --gpu --no-peak --repeats "${REPEATS:-10}"
