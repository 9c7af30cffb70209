#!/usr/bin/env bash
# The main job on the embedded default: set up, build the demo atlas (a local store in Census
# layout), ingest its blood cells into shards. Later stages are appended as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" RAY_AUTH_MODE=disabled MASTER_ADDR=127.0.0.1 RAY_USAGE_STATS_ENABLED=0
OUT=${DEMO_OUT:-demo_out}
mkdir -p "$OUT"
ingest build-demo --out "$OUT/census"
ingest census --census-uri "$OUT/census" --tissue blood --out "$OUT/shards_blood"
ingest validate "$OUT/shards_blood"
