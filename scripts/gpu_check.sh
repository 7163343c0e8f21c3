#!/usr/bin/env bash
# The GPU check, ready for the minutes a GPU is lent (under 8 minutes on one GPU):
#   1. set up with CUDA torch (MERGE_EVAL_TORCH=cuda scripts/setup.sh) and check that CUDA is there;
#   2. the gpu-marked tests (tests/test_gpu.py: capture equals HF on CUDA in bf16 and fp32; probes of CUDA
#      captures equal CPU probes within float noise);
#   3. a timed embedded run in bf16 (configs/gpu_check.yaml: the embedded base, a child and their merge), then
#      each stage's planned and measured time and forward tokens per second (python -m flows.plan --run-dir).
# Usage:
#   scripts/gpu_check.sh                 # on a GPU machine
#   scripts/gpu_check.sh --cpu-dry-run   # the same steps on the CPU with the tiny settings: tests the script itself
# Output goes to the terminal; the run directory is kept under $GPU_CHECK_DIR (default: a fresh temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-gpu}
case "$mode" in
  gpu) device=cuda ;;
  --cpu-dry-run) device=cpu ;;
  *) echo "usage: scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
started=$(date +%s)
stamp() { echo "gpu_check: $1 ($(( $(date +%s) - started )) s)"; }

if [ "$device" = cuda ]; then
  MERGE_EVAL_TORCH=cuda scripts/setup.sh
  .venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || { echo "gpu_check: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') sees no CUDA GPU" >&2; exit 2; }
  .venv/bin/python -c 'import torch; print("gpu_check:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD" MERGE_EVAL_GPU_TEST_DEVICE="$device"
stamp "setup done"

.venv/bin/python -m pytest -q -m gpu tests/test_gpu.py
stamp "gpu tests done"

work=${GPU_CHECK_DIR:-$(mktemp -d -t merge-eval-gpu-check-XXXXXX)}
mkdir -p "$work"
config="$work/gpu_check.yaml"
sed -e "s/^device: .*/device: $device/" configs/gpu_check.yaml > "$config"
if [ "$device" = cpu ]; then  # the dry run: the same steps, a workload a 2-core CPU finishes in minutes, in
  # float32: a CPU without bfloat16 kernels (AVX2 only) runs bfloat16 7.5x slower (docs/PERFORMANCE.md)
  sed -i -e 's/limit: [0-9]*}/limit: 2}/' -e 's/tokens: [0-9]*/tokens: 256/' -e 's/pairs: [0-9]*}/pairs: 20}/' \
    -e 's/^precision: .*/precision: float32/' "$config"
fi
export PREFECT_HOME="$work/prefect"
.venv/bin/python -m flows.cli run "$config" --run-dir "$work/run"
stamp "timed run done"
.venv/bin/python -m flows.plan "$config" --run-dir "$work/run"
stamp "done; run directory $work/run"
