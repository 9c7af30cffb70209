#!/usr/bin/env bash
# The main job on the embedded default, end to end, with nothing to start by hand (about 20 minutes
# on 2 idle CPU cores):
#   set up .venv -> build the demo atlas (a local store in Census layout) -> ingest its blood cells
#   except the symphony PBMCs (held out for evaluation) -> validate -> pretrain the `cpu` preset on a
#   local Ray (loopback, 2 CPU workers, DeepSpeed ZeRO-2), tracked in a local MLflow database and
#   registered -> held-out generative loss against trivial predictors -> evaluate the registered
#   version on every task at a budget that learns -> a summary in plain words.
# Everything lands in $DEMO_OUT (default demo_out/); re-running reuses what is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # Ray's environment: ingest and train set it (localray.prepare)
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
OUT=${DEMO_OUT:-demo_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
HELD_OUT="dataset_id not in ['symphony-pbmc-3pv1', 'symphony-pbmc-3pv2', 'symphony-pbmc-5p']"
t0=$SECONDS

echo "== 1/6 demo atlas (Census layout) -> $OUT/census"
ingest build-demo --out "$OUT/census"
echo "== 2/6 ingest census --tissue blood, symphony PBMCs held out -> $OUT/shards_pretrain"
ingest census --census-uri "$OUT/census" --tissue blood --obs-filter "$HELD_OUT" --out "$OUT/shards_pretrain"
echo "== 3/6 validate shards"
ingest validate "$OUT/shards_pretrain"
echo "== 4/6 pretrain the cpu preset (about 10 minutes: 2 CPU workers, ZeRO-2) -> models:/scgpt-cpu"
# A re-run reuses the registered model while the shard set it was trained on is unchanged (same manifest
# hash) and its tracking database is there; otherwise it trains (and registers) a new version, and the
# scores of the older one below are recomputed.
SHARDS_HASH=$(python -c "from shardset import Manifest; print(Manifest.load('$OUT/shards_pretrain').hash())")
if [ -s "$OUT/pretrained_model_uri" ] && [ "$(cat "$OUT/pretrained_shards_hash" 2>/dev/null)" = "$SHARDS_HASH" ] \
   && { [ "$MLFLOW_TRACKING_URI" != "sqlite:///$OUT/mlflow.db" ] || [ -s "$OUT/mlflow.db" ]; }; then
  echo "reusing $(cat "$OUT/pretrained_model_uri"), trained on these shards (delete $OUT/pretrained_model_uri to pretrain again)"
else
  rm -f "$OUT/pretrained_model_uri" "$OUT/pretrained_shards_hash" "$OUT/gep.md" "$OUT/suite.md"
  train pretrain --config cpu --shards "$OUT/shards_pretrain" --storage-path "$OUT/runs" --model-name scgpt-cpu \
    | tee "$OUT/pretrain.log"
  awk '/^model: models:/ {print $2}' "$OUT/pretrain.log" | tail -1 > "$OUT/pretrained_model_uri"
  echo "$SHARDS_HASH" > "$OUT/pretrained_shards_hash"
fi
MODEL=$(cat "$OUT/pretrained_model_uri")
[ -n "$MODEL" ] || { echo "demo: pretraining registered no model (see $OUT/pretrain.log)" >&2; exit 1; }
# Scores are written to a temporary name and renamed when the command succeeds, so a re-run reuses only
# finished ones.
echo "== 5/6 held-out generative loss of $MODEL against trivial predictors"
if [ -s "$OUT/gep.md" ]; then
  echo "reusing $OUT/gep.md, the scores of $MODEL (delete it to score again)"; cat "$OUT/gep.md"
else
  evaluate gep --model "$MODEL" --shards "$OUT/shards_pretrain" --dataset symphony --max-cells 1000 \
    | tee "$OUT/gep.md.tmp"
  mv "$OUT/gep.md.tmp" "$OUT/gep.md"
fi
echo "== 6/6 evaluate suite on $MODEL, datasets held out of pretraining (CPU budget: 600 cells, 200 HVGs, 5 epochs; at least 600 steps per annotation / integration fine-tune, 150 per perturbation fine-tune)"
if [ -s "$OUT/suite.md" ]; then
  echo "reusing $OUT/suite.md, the scores of $MODEL (delete it to evaluate again)"; cat "$OUT/suite.md"
else
  evaluate suite --model "$MODEL" --held-out-only --max-cells 600 --n-hvg 200 --epochs 5 --splits 2 \
    --max-perturbations 8 --min-steps 600 --perturbation-min-steps 150 --out "$OUT/eval" | tee "$OUT/suite.md.tmp"
  mv "$OUT/suite.md.tmp" "$OUT/suite.md"
fi
echo "demo: done in $(( (SECONDS - t0) / 60 )) min. Scores: $OUT/suite.md. Follow-up commands (README.md, 'After the main job'):"
echo "  source .venv/bin/activate; export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
echo "  mlflow ui --backend-store-uri \$MLFLOW_TRACKING_URI"
