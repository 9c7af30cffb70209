#!/usr/bin/env bash
# The main job on the embedded default, end to end, with nothing to start by hand:
#   set up .venv -> build the demo atlas (a local store in Census layout) -> ingest its blood
#   cells into shards -> validate them -> pretrain the `debug` preset on a local Ray (loopback,
#   2 CPU workers, DeepSpeed ZeRO-2) tracked in a local MLflow database and registered ->
#   evaluate the registered version on every task (a CPU-sized suite).
# Everything lands in $DEMO_OUT (default demo_out/); re-running reuses what is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" RAY_AUTH_MODE=disabled MASTER_ADDR=127.0.0.1 RAY_USAGE_STATS_ENABLED=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
OUT=${DEMO_OUT:-demo_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}

echo "== 1/5 demo atlas (Census layout) -> $OUT/census"
ingest build-demo --out "$OUT/census"
echo "== 2/5 ingest census --tissue blood -> $OUT/shards_blood"
ingest census --census-uri "$OUT/census" --tissue blood --out "$OUT/shards_blood"
echo "== 3/5 validate shards"
ingest validate "$OUT/shards_blood"
echo "== 4/5 pretrain (debug preset, 2 CPU workers, ZeRO-2) and register models:/scgpt-debug"
train pretrain --config debug --shards "$OUT/shards_blood" --max-steps 40 --storage-path "$OUT/runs" \
  --model-name scgpt-debug
echo "== 5/5 evaluate suite on the registered model (CPU-sized: 400 cells, 300 HVGs, 2 epochs)"
evaluate suite --model models:/scgpt-debug/latest --max-cells 400 --n-hvg 300 --epochs 2 --out "$OUT/eval"
echo "demo: done. MLflow UI: mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI"
