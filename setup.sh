#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned dependencies. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# torch first and on its own, so pip takes the local CPU wheel instead of a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch, onnxruntime; print("torch", torch.__version__, "/ onnxruntime", onnxruntime.__version__)'))"
