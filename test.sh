#!/usr/bin/env bash
# Runs the whole test suite (CPU only: real Triton from the nvidia-pytriton wheel, real ONNX Runtime).
# Extra arguments go to pytest, e.g. `bash test.sh -k launcher`.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
