#!/usr/bin/env bash
# Build model_store/style_transfer.mar: the handler, the nst core package,
# the VGG19 feature weights (+ their kind) and the model config.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
WEIGHTS=${WEIGHTS:-weights/vgg19_features.pth}
OUT=${OUT:-model_store}
MODEL_CONFIG=${MODEL_CONFIG:-handler/model-config.yaml}
[ -f "$WEIGHTS" ] || { echo "missing $WEIGHTS: run 'make weights' first" >&2; exit 1; }

# --extra-files copies a directory's *contents* flat into the archive root,
# so stage a directory that holds the nst/ package itself.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/extra"
cp -r handler/nst "$stage/extra/nst"
find "$stage/extra" -name __pycache__ -prune -exec rm -rf {} +
cp "${WEIGHTS%.pth}.json" "$stage/extra/"

# The archiver assembles its files in $TMPDIR/style_transfer, a name every
# build on the machine shares: two checkouts building at once failed, or
# mixed one's handler with the other's model config. It gets a TMPDIR of its
# own, and writes beside the archive, which is then renamed into place, so a
# failed build never leaves a half-written archive that make would take for
# a built one.
mkdir -p "$stage/tmp" "$OUT"
building=$(mktemp -d "$OUT/.building.XXXXXX")
trap 'rm -rf "$stage" "$building"' EXIT
TMPDIR="$stage/tmp" "$BIN/torch-model-archiver" \
  --model-name style_transfer \
  --version 1.0 \
  --handler handler/style_transfer_handler.py \
  --serialized-file "$WEIGHTS" \
  --extra-files "$stage/extra" \
  --config-file "$MODEL_CONFIG" \
  --export-path "$building" \
  --force
mv -f "$building/style_transfer.mar" "$OUT/style_transfer.mar"
echo "built $OUT/style_transfer.mar"
