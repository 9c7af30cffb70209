#!/usr/bin/env bash
# Create .venv and install the project with its locked dependencies (CPU torch first, then the rest).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v uv >/dev/null 2>&1; then
  "$PY" -m pip install -q uv
fi
[ -x .venv/bin/python ] || uv venv -q -p "$PY" .venv
export VIRTUAL_ENV="$PWD/.venv"
FL=()
[ -n "${PIP_FIND_LINKS:-}" ] && FL=(--find-links "$PIP_FIND_LINKS")
# torch first, from the local CPU wheel where the machine has one; the constraints file pins it.
uv pip install -q "${FL[@]}" -c constraints.txt torch==2.13.0
uv pip install -q "${FL[@]}" -c constraints.txt -e ".[test]"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
