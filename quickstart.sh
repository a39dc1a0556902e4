#!/usr/bin/env bash
# One command from a fresh checkout to a try-on image, on the CPU, with no GPU and no Docker:
# sets up .venv, exports the pipeline to ONNX (seeded random-init weights unless checkpoints are given),
# starts the real Triton server from the nvidia-pytriton wheel and runs the client on drawn samples:
# client/tryon.py on the sample pairs (PIPELINE=tryon, the default), client/hair.py on the sample
# portraits, a hairstyle transfer (face, shape and colour reference) and an edit (PIPELINE=hair), or,
# with PIPELINE=catalogue, the two
# catalogue models trained on Fashion-MNIST and shipped in models/catalogue/ (sha256-checked; no
# training step): the fashion generator draws garments and the garment classifier labels them, on one
# contact sheet.
# The bundle goes through the MLflow registry (SQLite, local artifacts): registered, promoted to the
# alias 'production', and synced into Triton, which serves exactly that version.
#
# Settings (environment variables):
#   PIPELINE       tryon (default), hair or catalogue
#   CONDITION_CHECKPOINT, IMAGE_CHECKPOINT  try-on: official-layout .pth files (default: random-init,
#                  outputs are noise)
#   HAIRFAST_DIR, CLIP_CHECKPOINT  hair: HairFastGAN's pretrained_models/ folder and OpenAI's CLIP
#                  ViT-B-32.pt (SEAN_CODES: the folder of SEAN's mean style codes, if not found from
#                  HAIRFAST_DIR); default: random-init, tiny widths, outputs are noise
#   RESOLUTION     try-on: HEIGHTxWIDTH, default 1024x768 (512x384 and 256x192 are faster);
#                  hair: the side of the square portraits, 1024 with HAIRFAST_DIR; random-init: default
#                  256 (512 or 1024 are slower), at the tiny widths unless WIDTHS=public
#   HTTP_PORT, GRPC_PORT, METRICS_PORT, MLFLOW_PORT   default 8000, 8001, 8002, 5000
#   KEEP_SERVER=1  leave Triton and MLflow running at the end
set -euo pipefail
cd "$(dirname "$0")"
PIPELINE=${PIPELINE:-tryon}
case "$PIPELINE" in
  tryon) RESOLUTION=${RESOLUTION:-1024x768} ;;
  hair) RESOLUTION=${RESOLUTION:-$([ -n "${HAIRFAST_DIR:-}" ] && echo 1024 || echo 256)} ;;
  catalogue) RESOLUTION=32x32 ;;  # what the shipped generator was trained at
  *) echo "error: PIPELINE must be tryon, hair or catalogue, got '$PIPELINE'" >&2; exit 2 ;;
esac
HTTP_PORT=${HTTP_PORT:-8000}
GRPC_PORT=${GRPC_PORT:-8001}
METRICS_PORT=${METRICS_PORT:-8002}
WORK=work
PY=.venv/bin/python

bash setup.sh

echo "== export ($PIPELINE, $RESOLUTION)"
CATALOGUE_MODELS=(garment_classifier fashion_generator)
if [ "$PIPELINE" = catalogue ]; then
  (cd models/catalogue && sha256sum --check --quiet SHA256SUMS)
  for MODEL in "${CATALOGUE_MODELS[@]}"; do
    rm -rf "$WORK/bundles/$MODEL"
    $PY "export/$MODEL.py" --checkpoint "models/catalogue/$MODEL.pt" --out "$WORK/bundles/$MODEL"
  done
  CHECKPOINTS=models/catalogue
elif [ "$PIPELINE" = tryon ]; then
  CHECKPOINTS=${CONDITION_CHECKPOINT:-}${IMAGE_CHECKPOINT:-}
  WEIGHTS=(--condition-checkpoint "${CONDITION_CHECKPOINT:-}" --image-checkpoint "${IMAGE_CHECKPOINT:-}")
else
  CHECKPOINTS=${HAIRFAST_DIR:-}${CLIP_CHECKPOINT:-}
  WEIGHTS=(--hairfast-dir "${HAIRFAST_DIR:-}" --clip-checkpoint "${CLIP_CHECKPOINT:-}")
  [ -z "${SEAN_CODES:-}" ] || WEIGHTS+=(--sean-codes "$SEAN_CODES")
fi
if [ "$PIPELINE" != catalogue ]; then
  SIZES=(--resolution "$RESOLUTION")
  if [ -n "$CHECKPOINTS" ]; then
    BUNDLE=$WORK/bundles/$PIPELINE
  else
    BUNDLE=$WORK/bundles/$PIPELINE-random-init
    WEIGHTS=(--random-init --seed 0)
    [ "$PIPELINE" = tryon ] || SIZES+=(--widths "${WIDTHS:-tiny}")
  fi
  rm -rf "$BUNDLE"
  $PY "export/$PIPELINE.py" "${WEIGHTS[@]}" "${SIZES[@]}" --out "$BUNDLE"
fi

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
register_and_promote() {  # bundle folder, registered model name
  $PY mlflow/register.py "$1" --model "$2" | tee "$WORK/register.log"
  VERSION=$(sed -n "s/^registered '$2' version \([0-9]*\).*/\1/p" "$WORK/register.log")
  $PY mlflow/promote.py "$2" --version "$VERSION"
}
if [ "$PIPELINE" = catalogue ]; then
  SERVED=("${CATALOGUE_MODELS[@]}")
  for MODEL in "${SERVED[@]}"; do register_and_promote "$WORK/bundles/$MODEL" "$MODEL"; done
else
  SERVED=("$PIPELINE")
  register_and_promote "$BUNDLE" "$PIPELINE"
fi

echo "== Triton (explicit model control), synced to the 'production' alias"
rm -rf "$WORK/served" && mkdir -p "$WORK/served"
$PY -m fashionserve.launcher start --repository "$WORK/served" --model-control explicit --detach \
  --pid-file "$WORK/triton.pid" --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT"
MODEL_ARGS=(); for MODEL in "${SERVED[@]}"; do MODEL_ARGS+=(--model "$MODEL"); done
$PY mlflow/sync.py "${MODEL_ARGS[@]}" --repository "$WORK/served" --triton-url "127.0.0.1:$HTTP_PORT"

rm -rf "$WORK/results"
if [ "$PIPELINE" = tryon ]; then
  echo "== try-on (drawn sample pairs)"
  rm -rf "$WORK/samples"
  $PY client/make_samples.py "$WORK/samples" --height "${RESOLUTION%x*}" --width "${RESOLUTION#*x}"
  $PY client/tryon.py --dataroot "$WORK/samples" --url "127.0.0.1:$GRPC_PORT" --out "$WORK/results"
  NEEDED="CONDITION_CHECKPOINT and IMAGE_CHECKPOINT"
elif [ "$PIPELINE" = catalogue ]; then
  echo "== generated garments, labelled by the garment classifier"
  $PY client/generate.py --count 48 --columns 8 --scale 4 --classifier garment_classifier \
    --url "127.0.0.1:$GRPC_PORT" --out "$WORK/results/catalogue.png"
else
  echo "== hair transfer and hair edit (drawn sample portraits)"
  $PY client/hair.py --url "127.0.0.1:$GRPC_PORT" --out "$WORK/results"
  $PY client/hair.py --strength 2 --url "127.0.0.1:$GRPC_PORT" --out "$WORK/results"
  NEEDED="HAIRFAST_DIR and CLIP_CHECKPOINT"
fi

echo
echo "Done. The $PIPELINE images are in $WORK/results/"
if [ -z "$CHECKPOINTS" ]; then
  echo "(random-init weights: the images are noise; pass $NEEDED for real results)"
fi
echo "MLflow: ${SERVED[*]}: the promoted versions hold the alias 'production' and are live in Triton."
if [ "${KEEP_SERVER:-0}" = 1 ]; then
  echo "Triton keeps running (HTTP 127.0.0.1:$HTTP_PORT, gRPC 127.0.0.1:$GRPC_PORT);"
  echo "the MLflow UI is at $MLFLOW_TRACKING_URI/#/models/${SERVED[0]}"
  WEB_DATA=""; [ -d "$WORK/samples/test/image" ] && WEB_DATA=" --dataroot $WORK/samples"
  echo "Web app (try-on, hairstyles): $PY -m web --triton 127.0.0.1:$GRPC_PORT$WEB_DATA \\"
  echo "    --mlflow-uri $MLFLOW_TRACKING_URI   then open http://127.0.0.1:8080/"
  echo "Stop them with: .venv/bin/python -m fashionserve.launcher stop --pid-file $WORK/triton.pid"
  echo "           and: .venv/bin/python -m fashionserve.mlflow_server stop --pid-file $WORK/mlflow.pid"
else
  echo "Triton and MLflow were stopped. To keep them up (and browse the MLflow UI at"
  echo "$MLFLOW_TRACKING_URI/#/models/${SERVED[0]}): PIPELINE=$PIPELINE KEEP_SERVER=1 bash quickstart.sh"
  echo "then stop them with: .venv/bin/python -m fashionserve.launcher stop --pid-file $WORK/triton.pid"
  echo "                and: .venv/bin/python -m fashionserve.mlflow_server stop --pid-file $WORK/mlflow.pid"
fi
