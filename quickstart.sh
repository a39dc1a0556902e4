#!/usr/bin/env bash
# One command from a fresh checkout to a try-on image, on the CPU, with no GPU and no Docker:
# sets up .venv, draws the sample set, exports the try-on pipeline to ONNX (seeded random-init weights
# unless checkpoints are given), renders the cpu model repository, starts the real Triton server from the
# nvidia-pytriton wheel and runs client/tryon.py on the sample pairs.
# The bundle goes through the MLflow registry (SQLite, local artifacts): registered, promoted to the
# alias 'production', and synced into Triton, which serves exactly that version.
#
# Settings (environment variables):
#   CONDITION_CHECKPOINT, IMAGE_CHECKPOINT  official-layout .pth files (default: random-init, outputs are noise)
#   RESOLUTION     HEIGHTxWIDTH, default 1024x768 (512x384 and 256x192 are faster)
#   HTTP_PORT, GRPC_PORT, METRICS_PORT, MLFLOW_PORT   default 8000, 8001, 8002, 5000
#   KEEP_SERVER=1  leave Triton and MLflow running at the end
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

echo "== MLflow registry: register and promote"
MLFLOW_PORT=${MLFLOW_PORT:-5000}
stop_servers() {
  $PY -m fashionserve.launcher stop --pid-file "$WORK/triton.pid" >/dev/null 2>&1 || true
  $PY -m fashionserve.mlflow_server stop --pid-file "$WORK/mlflow.pid" >/dev/null 2>&1 || true
}
stop_servers  # servers a previous run left up with KEEP_SERVER=1
$PY -m fashionserve.mlflow_server start --root "$WORK/mlflow" --port "$MLFLOW_PORT" --detach \
  --pid-file "$WORK/mlflow.pid"
[ "${KEEP_SERVER:-0}" = 1 ] || trap stop_servers EXIT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
$PY mlflow/register.py "$BUNDLE" --model tryon | tee "$WORK/register.log"
VERSION=$(sed -n "s/^registered 'tryon' version \([0-9]*\).*/\1/p" "$WORK/register.log")
$PY mlflow/promote.py tryon --version "$VERSION"

echo "== Triton (explicit model control), synced to the 'production' alias"
rm -rf "$WORK/served" && mkdir -p "$WORK/served"
$PY -m fashionserve.launcher start --repository "$WORK/served" --model-control explicit --detach \
  --pid-file "$WORK/triton.pid" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT"
$PY mlflow/sync.py --repository "$WORK/served" --triton-url "127.0.0.1:$HTTP_PORT"

echo "== try-on"
rm -rf "$WORK/results"
$PY client/tryon.py --dataroot "$WORK/samples" --url "127.0.0.1:$GRPC_PORT" --out "$WORK/results"

echo
echo "Done. Try-on images are in $WORK/results/"
if [ -z "${CONDITION_CHECKPOINT:-}" ]; then
  echo "(random-init weights: the images are noise; pass CONDITION_CHECKPOINT and IMAGE_CHECKPOINT for real results)"
fi
echo "MLflow: model 'tryon' version $VERSION holds the alias 'production' and is live in Triton."
if [ "${KEEP_SERVER:-0}" = 1 ]; then
  echo "Triton keeps running (HTTP 127.0.0.1:$HTTP_PORT, gRPC 127.0.0.1:$GRPC_PORT);"
  echo "the MLflow UI is at $MLFLOW_TRACKING_URI/#/models/tryon"
  echo "Stop them with: .venv/bin/python -m fashionserve.launcher stop --pid-file $WORK/triton.pid"
  echo "           and: .venv/bin/python -m fashionserve.mlflow_server stop --pid-file $WORK/mlflow.pid"
else
  echo "Triton and MLflow were stopped. To keep them up (and browse the MLflow UI at"
  echo "$MLFLOW_TRACKING_URI/#/models/tryon): KEEP_SERVER=1 bash quickstart.sh"
  echo "then stop them with: .venv/bin/python -m fashionserve.launcher stop --pid-file $WORK/triton.pid"
  echo "                and: .venv/bin/python -m fashionserve.mlflow_server stop --pid-file $WORK/mlflow.pid"
fi
