#!/usr/bin/env bash
# GPU check: what this project's CI cannot run, in three parts.
#
#   benchmarks/gpu_check.sh prepare [DIR]   on a CPU machine (the project's venv): builds the default model
#       (tiny-llama), exports it in fp32 and fp16 (both graphs) and records ONNX Runtime's CPU answers (greedy
#       tokens, logits and scalings of three left-padded prompts) as the reference. DIR defaults to
#       benchmarks/.cache/gpu-check (ignored by git; carry it to the GPU machine).
#   benchmarks/gpu_check.sh quick [DIR]     on a fresh GPU machine, about 8 minutes with the install: a venv of
#       its own (DIR/venv) with the pinned GPU stack and the runtime (no torch), the versions and the driver,
#       TensorRT engines of both exports (xlora-engine), every GPU provider against the CPU reference
#       (trt-engine fp32/fp16, cuda fp32/fp16, ONNX Runtime's TensorRT provider fp32; a session that did not get
#       the provider asked for is an error), and the Triton repository's engine (xlora-triton --backend
#       tensorrt: its profiles hold Triton's first-request state).
#   benchmarks/gpu_check.sh full [DIR]      quick, then torch and the project: polygraphy's TensorRT
#       against ONNX Runtime, xlora-parity of each GPU path against the eager model, the suite's GPU tests (a
#       skipped one fails the check), timings of every backend (benchmarks/bench_backends.py).
#
# The pinned stack (one tested combination; nothing else is installed beside it):
#   onnxruntime-gpu (CUDA 12, cuDNN 9 from its extras) alone: the CPU package `onnxruntime` is removed, as both
#   write the same module and the GPU providers can vanish when both are installed;
#   TensorRT 10 for the engines and for ONNX Runtime's TensorRT provider, which links TensorRT 10 (TensorRT 11
#   needs CUDA 13 and another environment).
# Any failed check stops the script with a non-zero exit.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-}"
WORK="${2:-benchmarks/.cache/gpu-check}"
ORT_GPU="onnxruntime-gpu[cuda,cudnn]==1.31.1"
TENSORRT="tensorrt-cu12==10.16.1.11"
POLYGRAPHY="polygraphy==0.53.6"
ONNX="onnx==1.23.2"
TORCH="torch==2.13.0"
LIMITS=(--max-batch 4 --max-sequence 64 --max-total 128)
start=$SECONDS
step() { echo; echo "== [$((SECONDS - start)) s] $*"; }

prepare() {
  export PYTHONPATH="$PWD:$PWD/runtime${PYTHONPATH:+:$PYTHONPATH}"
  mkdir -p "$WORK"
  step "build the default model and export it (fp32, fp16)"
  python -m models.recipes tiny-llama --out "$WORK"
  for dtype in fp32 fp16; do
    python -m xlora_export.cli "$WORK/tiny-llama" "$WORK/$dtype.onnx" --dtype "$dtype" --frozen-scalings --force -q
    python benchmarks/gpu_check.py reference "$WORK/$dtype.onnx" "$WORK/$dtype.reference.npz"
  done
  step "prepared $WORK: carry it to the GPU machine, then run benchmarks/gpu_check.sh quick (or full)"
}

gpu_env() {
  step "a venv of its own: the pinned GPU stack and the runtime"
  if [ ! -x "$WORK/venv/bin/python" ]; then
    python3 -m venv "$WORK/venv"
  fi
  # shellcheck disable=SC1091
  . "$WORK/venv/bin/activate"
  pip install -q --disable-pip-version-check "$ORT_GPU" "$TENSORRT" "$POLYGRAPHY" "$ONNX" "numpy<3" \
    "tokenizers>=0.23.1"
  pip install -q --disable-pip-version-check --no-deps -e runtime
  pip uninstall -q -y onnxruntime 2>/dev/null || true  # the CPU package must not shadow the GPU one
  # the CUDA, cuDNN and TensorRT libraries of the wheels, for ONNX Runtime's providers
  LD_LIBRARY_PATH="$(python - <<'EOF'
import glob, os, site
roots = site.getsitepackages()
libs = [d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "lib")) + glob.glob(os.path.join(r, "tensorrt_libs"))]
print(":".join(libs))
EOF
)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LD_LIBRARY_PATH
  export PYTHONPATH="$PWD/runtime"
  step "environment"
  pip list 2>/dev/null | grep -Ei "^(onnxruntime|tensorrt|polygraphy|onnx|numpy|nvidia-cuda-runtime|nvidia-cudnn)" || true
  if pip list 2>/dev/null | grep -Eq "^onnxruntime "; then
    echo "onnxruntime (CPU) is installed beside onnxruntime-gpu"; exit 1
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not found"
  python benchmarks/gpu_check.py environment
}

quick() {
  for dtype in fp32 fp16; do
    [ -f "$WORK/$dtype.onnx" ] || { echo "$WORK/$dtype.onnx: run benchmarks/gpu_check.sh prepare first"; exit 1; }
  done
  gpu_env
  step "xlora-engine: fp32 and fp16 engines (prefill and decode profiles)"
  for dtype in fp32 fp16; do
    xlora-engine "$WORK/$dtype.onnx" "$WORK/$dtype.engine" "${LIMITS[@]}" \
      --timing-cache "$WORK/timing.cache" --force
  done
  step "every GPU path against the CPU reference (tokens equal, logits within the dtype's tolerance)"
  python benchmarks/gpu_check.py compare "$WORK/fp32.engine" trt-engine "$WORK/fp32.reference.npz" --atol 1e-3
  python benchmarks/gpu_check.py compare "$WORK/fp16.engine" trt-engine "$WORK/fp16.reference.npz" --atol 5e-2
  python benchmarks/gpu_check.py compare "$WORK/fp32.onnx" cuda "$WORK/fp32.reference.npz" --atol 1e-3
  python benchmarks/gpu_check.py compare "$WORK/fp16.onnx" cuda "$WORK/fp16.reference.npz" --atol 5e-2
  python benchmarks/gpu_check.py compare "$WORK/fp32.onnx" tensorrt "$WORK/fp32.reference.npz" --atol 1e-3
  step "xlora-triton --backend tensorrt: the served graph's engine (first-request and decode profiles)"
  rm -rf "$WORK/triton" && mkdir -p "$WORK/triton"
  xlora-triton "$WORK/fp32.onnx" "$WORK/triton" --backend tensorrt "${LIMITS[@]}"
  step "quick part: every check passed ($WORK)"
}

full() {
  quick
  step "torch and the project, for the eager model"
  pip install -q --disable-pip-version-check "$TORCH"
  pip install -q --disable-pip-version-check -e ".[test]"
  pip uninstall -q -y onnxruntime 2>/dev/null || true
  export PYTHONPATH="$PWD:$PWD/runtime"
  step "polygraphy: the fp32 graph on TensorRT against ONNX Runtime (a prefill; the wide profile of profiles.py)"
  python benchmarks/gpu_check.py polygraphy "$WORK/fp32.onnx" "$WORK/prefill-inputs.json" "$WORK/trt-shapes.txt"
  # shellcheck disable=SC2046  # one word per shape argument
  polygraphy run "$WORK/fp32.onnx" --trt --onnxrt --load-inputs "$WORK/prefill-inputs.json" \
    $(cat "$WORK/trt-shapes.txt") --atol 1e-3 --rtol 1e-3 --check-error-stat max
  step "xlora-parity against the eager model"
  python -m xlora_export.parity "$WORK/tiny-llama" "$WORK/fp32.engine" --provider trt-engine --json "$WORK/parity-fp32-engine.json"
  python -m xlora_export.parity "$WORK/tiny-llama" "$WORK/fp16.engine" --provider trt-engine --json "$WORK/parity-fp16-engine.json"
  python -m xlora_export.parity "$WORK/tiny-llama" "$WORK/fp32.onnx" --provider cuda --json "$WORK/parity-fp32-cuda.json"
  python -m xlora_export.parity "$WORK/tiny-llama" "$WORK/fp16.onnx" --provider cuda --json "$WORK/parity-fp16-cuda.json"
  python -m xlora_export.parity "$WORK/tiny-llama" "$WORK/fp32.onnx" --provider tensorrt --json "$WORK/parity-fp32-ort-trt.json"
  step "the suite's GPU tests (a skipped one fails the check)"
  python -m pytest -q -rs tests/test_tensorrt.py -k "OnGpu" | tee "$WORK/gpu-tests.log"
  if grep -q "SKIPPED" "$WORK/gpu-tests.log"; then echo "a GPU test was skipped"; exit 1; fi
  step "timings (batch 1, prompt 64, 32 new tokens)"
  python benchmarks/bench_backends.py "$WORK/fp32.onnx@cpu" "$WORK/fp32.onnx@cuda" "$WORK/fp32.onnx@tensorrt" \
    "$WORK/fp32.engine" "$WORK/fp16.onnx@cuda" "$WORK/fp16.engine" --json "$WORK/timings.json"
  step "full part: every check passed ($WORK)"
}

case "$MODE" in
  prepare) prepare ;;
  quick) quick ;;
  full) full ;;
  *) echo "usage: benchmarks/gpu_check.sh prepare|quick|full [DIR]"; exit 2 ;;
esac
