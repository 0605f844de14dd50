#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and this repository, in a few minutes:
#   1. the environment: .venv (make setup when missing) + the [cuda] extra (libcudart 13 from pip),
#      and onnxruntime-gpu in place of onnxruntime (for ONNX Runtime's CUDA EP);
#   2. the tests marked gpu (tests/runtimes/test_cuda.py, tests/test_compile.py);
#   3. bench/gpu_check.py: MobileNetV2 and ResNet-18 compiled for this GPU (float32 and float16),
#      verified on it, timed against ORT-CUDA and PyTorch CUDA, profiled; one table.
#
#   bench/gpu_check.sh [--dry-run] [gpu_check.py options, e.g. --rounds 5 -o table.md]
#
# Without a GPU it stops after saying so (exit 2); --dry-run goes on with the CPU standing in
# (nothing is installed then: it checks the script and the build, not a GPU).
# Environment:
#   WHEELS=DIR        install offline from a directory of wheels (pip --no-index --find-links DIR)
#   ORT_GPU=0         keep the CPU onnxruntime (no CUDA EP column)
#   TORCH_PYTHON=PY   a Python whose torch is a CUDA build, for the PyTorch column
#                     [default: .venv's python or python3, whichever torch sees the GPU]
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=0
args=()
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then dry_run=1; else args+=("$arg"); fi
done
PY=.venv/bin/python
failed=()
step() { echo; echo "=== $*"; }

step "GPU"
if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; then
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv
else
  echo "no NVIDIA GPU here (nvidia-smi: $(command -v nvidia-smi || echo 'not installed'))"
  if [ "$dry_run" = 0 ]; then
    echo "nothing to run on this machine; bench/gpu_check.sh --dry-run checks the CPU-side steps"
    exit 2
  fi
fi

step "environment"
pip_options=(-q --disable-pip-version-check -c constraints.txt)
if [ -n "${WHEELS:-}" ]; then pip_options+=(--no-index --find-links "$WHEELS"); fi
if [ ! -x "$PY" ]; then
  if [ -n "${WHEELS:-}" ]; then
    ${PYTHON:-python3.11} -m venv .venv && $PY -m pip install "${pip_options[@]}" -e '.[dev]' || { echo "could not create .venv"; exit 1; }
  else
    make setup || { echo "make setup failed"; exit 1; }
  fi
fi
if [ "$dry_run" = 1 ]; then
  echo "dry run: would run: $PY -m pip install ${pip_options[*]} -e '.[cuda]'"
  [ "${ORT_GPU:-1}" = 0 ] || echo "dry run: would replace onnxruntime by onnxruntime-gpu[cuda,cudnn]==$($PY -c 'import onnxruntime; print(onnxruntime.__version__)') + nvidia-cublas"
else
  $PY -m pip install "${pip_options[@]}" -e '.[cuda]' \
    || echo "WARNING: the [cuda] extra did not install; edgec will look for libcudart.so.13 elsewhere (CUDA_HOME, /usr/local/cuda, ldconfig)"
  if [ "${ORT_GPU:-1}" != 0 ]; then
    ort_version=$($PY -c 'import onnxruntime; print(onnxruntime.__version__)')
    if ! $PY -c 'import onnxruntime, sys; sys.exit("CUDAExecutionProvider" not in onnxruntime.get_available_providers())'; then
      # both wheels install the same onnxruntime package: one at a time
      $PY -m pip uninstall -q -y onnxruntime
      # its CUDA EP links CUDA 13, cuBLAS 13, cuRAND and cuDNN 9: NVIDIA's wheels, found by ort.preload_dlls()
      if ! $PY -m pip install "${pip_options[@]}" "onnxruntime-gpu[cuda,cudnn]==$ort_version" nvidia-cublas; then
        echo "WARNING: onnxruntime-gpu $ort_version did not install; back to onnxruntime (no ORT-CUDA column)"
        $PY -m pip install "${pip_options[@]}" "onnxruntime==$ort_version"
      fi
    fi
  fi
fi
$PY - <<'EOF'
import onnxruntime, tvm, edgec
from edgec.runtimes import cuda
from edgec.errors import NoCudaDeviceError
print(f"edgec {edgec.__version__}, TVM {tvm.__version__}, onnxruntime {onnxruntime.__version__} {onnxruntime.get_available_providers()}")
try:
    print("edgec sees:", cuda.gpu().as_dict())
except NoCudaDeviceError as error:
    print(error)
EOF

step "tests marked gpu"
if [ "$dry_run" = 1 ]; then
  $PY -m pytest -q -m gpu --collect-only tests/runtimes/test_cuda.py tests/test_compile.py | tail -3 || failed+=("gpu tests (collection)")
else
  $PY -m pytest -q -m gpu tests/runtimes/test_cuda.py tests/test_compile.py || failed+=("gpu tests")
fi

step "bench/gpu_check.py"
extra=()
[ "$dry_run" = 1 ] && extra+=(--dry-run)
[ -n "${TORCH_PYTHON:-}" ] && extra+=(--torch-python "$TORCH_PYTHON")
$PY bench/gpu_check.py "${extra[@]}" "${args[@]}"
rc=$?
[ $rc = 0 ] || failed+=("bench/gpu_check.py (exit $rc)")

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all steps passed$([ "$dry_run" = 1 ] && echo ' (dry run: no GPU was used)')"
