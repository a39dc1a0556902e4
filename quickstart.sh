#!/usr/bin/env bash
# One command from a fresh checkout to a try-on image, on the CPU, with no GPU and no Docker:
# sets up .venv, draws the sample set, exports the try-on pipeline to ONNX (seeded random-init weights
# unless checkpoints are given), renders the cpu model repository, starts the real Triton server from the
# nvidia-pytriton wheel and runs client/tryon.py on the sample pairs.
#
# Settings (environment variables):
#   CONDITION_CHECKPOINT, IMAGE_CHECKPOINT  official-layout .pth files (default: random-init, outputs are noise)
#   RESOLUTION     HEIGHTxWIDTH, default 1024x768 (512x384 and 256x192 are faster)
#   HTTP_PORT, GRPC_PORT, METRICS_PORT   default 8000, 8001, 8002
#   KEEP_SERVER=1  leave Triton running at the end
set -euo pipefail
cd "$(dirname "$0")"
RESOLUTION=${RESOLUTION:-1024x768}
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
WORK=work
PY=.venv/bin/python

bash setup.sh
HEIGHT=${RESOLUTION%x*}
WIDTH=${RESOLUTION#*x}

echo "== sample set ($RESOLUTION)"
rm -rf "$WORK/samples"
$PY client/make_samples.py "$WORK/samples" --height "$HEIGHT" --width "$WIDTH"

echo "== export"
if [ -n "${CONDITION_CHECKPOINT:-}${IMAGE_CHECKPOINT:-}" ]; then
  BUNDLE=$WORK/bundles/tryon
  WEIGHTS=(--condition-checkpoint "${CONDITION_CHECKPOINT:-}" --image-checkpoint "${IMAGE_CHECKPOINT:-}")
else
  BUNDLE=$WORK/bundles/tryon-random-init
  WEIGHTS=(--random-init --seed 0)
fi
rm -rf "$BUNDLE"
$PY export/tryon.py "${WEIGHTS[@]}" --resolution "$RESOLUTION" --out "$BUNDLE"

echo "== model repository (cpu target)"
rm -rf "$WORK/model_repository"
$PY export/render_repository.py "$BUNDLE" --target cpu --out "$WORK/model_repository"

echo "== Triton"
if [ -f "$WORK/triton.pid" ]; then
  $PY -m fashionserve.launcher stop --pid-file "$WORK/triton.pid" 2>/dev/null || true
fi
$PY -m fashionserve.launcher start --repository "$WORK/model_repository" --detach --pid-file "$WORK/triton.pid" \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT"
stop_server() { $PY -m fashionserve.launcher stop --pid-file "$WORK/triton.pid" >/dev/null 2>&1 || true; }
[ "${KEEP_SERVER:-0}" = 1 ] || trap stop_server EXIT

echo "== try-on"
rm -rf "$WORK/results"
$PY client/tryon.py --dataroot "$WORK/samples" --url "127.0.0.1:$GRPC_PORT" --out "$WORK/results"

echo
echo "Done. Try-on images are in $WORK/results/"
if [ -z "${CONDITION_CHECKPOINT:-}" ]; then
  echo "(random-init weights: the images are noise; pass CONDITION_CHECKPOINT and IMAGE_CHECKPOINT for real results)"
fi
if [ "${KEEP_SERVER:-0}" = 1 ]; then
  echo "Triton keeps running (HTTP 127.0.0.1:$HTTP_PORT, gRPC 127.0.0.1:$GRPC_PORT)."
  echo "Stop it with: .venv/bin/python -m fashionserve.launcher stop --pid-file $WORK/triton.pid"
else
  echo "Triton was stopped. To keep it up: KEEP_SERVER=1 bash quickstart.sh"
  echo "then stop it with: .venv/bin/python -m fashionserve.launcher stop --pid-file $WORK/triton.pid"
fi
