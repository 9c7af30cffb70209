"""Package boundaries that a stray import would break silently."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_evaluation_imports_neither_ingest_nor_tiledbsoma():
    # every eval module (the CLI and each task) in a fresh interpreter: evaluation reads h5ad files
    # and needs neither the Census builder nor the TileDB stack (issue 13 item 6)
    code = ("import importlib, json, pkgutil, sys, eval, eval.cli\n"
            "for m in pkgutil.iter_modules(eval.__path__):\n"
            "    importlib.import_module('eval.' + m.name)\n"
            "stack = ('ingest', 'tiledbsoma', 'tiledb')\n"
            "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] in stack)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
