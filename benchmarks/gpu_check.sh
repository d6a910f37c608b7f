#!/usr/bin/env bash
# GPU check: what this project's CI cannot run. On a machine with an NVIDIA GPU, TensorRT 10 or 11 and
# onnxruntime-gpu, in a few minutes:
#   1. builds the default model (tiny-llama) and exports it in fp32 and fp16 (both graphs),
#   2. polygraphy: the fp32 graph on TensorRT against ONNX Runtime (a prefill, the same inputs),
#   3. builds TensorRT engines from both exports with xlora-engine (one timing cache),
#   4. xlora-parity against the eager model: each engine (trt-engine), ONNX Runtime's CUDA provider (fp32, fp16),
#      the fp32 graph on ONNX Runtime's TensorRT provider; then the suite's GPU tests,
#   5. prints prefill/decode timings of every backend (benchmarks/bench_backends.py).
# Any failed check stops the script with a non-zero exit. Setup (in this repository):
#   pip install torch==2.13.0 -e "runtime[tensorrt,cuda]" -e ".[test]" onnxruntime-gpu
# Usage: benchmarks/gpu_check.sh [WORK_DIR]   (default: a new temporary folder; reports in WORK_DIR/*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d -t xlora-gpu-check-XXXX)}"
mkdir -p "$WORK"
export PYTHONPATH="$PWD:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
MODEL="$WORK/tiny-llama"
LIMITS=(--max-batch 4 --max-sequence 64 --max-total 128)
start=$SECONDS
step() { echo; echo "== [$((SECONDS - start)) s] $*"; }

step "environment"
python -c "
import onnxruntime, tensorrt
from xlora_runtime.backends.cuda import gpu_count
print(f'TensorRT {tensorrt.__version__}, onnxruntime {onnxruntime.__version__}: {onnxruntime.get_available_providers()}')
print(f'GPUs visible: {gpu_count()}')
assert gpu_count() > 0, 'no GPU visible'
"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

step "build the default model and export it (fp32, fp16)"
python -m models.recipes tiny-llama --out "$WORK"
for dtype in fp32 fp16; do
  python -m xlora_export.cli "$MODEL" "$WORK/$dtype.onnx" --dtype "$dtype" --frozen-scalings --force -q
done

step "polygraphy: the fp32 graph on TensorRT against ONNX Runtime (a prefill; the wide profile of profiles.py)"
python benchmarks/gpu_check_inputs.py "$WORK/fp32.onnx" "$WORK/prefill-inputs.json" "$WORK/trt-shapes.txt"
# shellcheck disable=SC2046  # one word per shape argument
polygraphy run "$WORK/fp32.onnx" --trt --onnxrt --load-inputs "$WORK/prefill-inputs.json" \
  $(cat "$WORK/trt-shapes.txt") --atol 1e-3 --rtol 1e-3 --check-error-stat max

step "xlora-engine: fp32 and fp16 engines (prefill and decode profiles)"
for dtype in fp32 fp16; do
  python -m xlora_runtime.engine "$WORK/$dtype.onnx" "$WORK/$dtype.engine" "${LIMITS[@]}" \
    --timing-cache "$WORK/timing.cache" --force
done

step "xlora-parity against the eager model"
python -m xlora_export.parity "$MODEL" "$WORK/fp32.engine" --provider trt-engine --json "$WORK/parity-fp32-engine.json"
python -m xlora_export.parity "$MODEL" "$WORK/fp16.engine" --provider trt-engine --json "$WORK/parity-fp16-engine.json"
python -m xlora_export.parity "$MODEL" "$WORK/fp32.onnx" --provider cuda --json "$WORK/parity-fp32-cuda.json"
python -m xlora_export.parity "$MODEL" "$WORK/fp16.onnx" --provider cuda --json "$WORK/parity-fp16-cuda.json"
python -m xlora_export.parity "$MODEL" "$WORK/fp32.onnx" --provider tensorrt --json "$WORK/parity-fp32-ort-trt.json"

step "the suite's GPU tests (they skip only without TensorRT or a GPU)"
python -m pytest -q -rs tests/test_tensorrt.py -k "OnGpu"

step "timings (batch 1, prompt 64, 32 new tokens)"
python benchmarks/bench_backends.py "$WORK/fp32.onnx@cpu" "$WORK/fp32.onnx@cuda" "$WORK/fp32.onnx@tensorrt" \
  "$WORK/fp32.engine" "$WORK/fp16.onnx@cuda" "$WORK/fp16.engine" --json "$WORK/timings.json"

step "done: every check passed ($WORK)"
