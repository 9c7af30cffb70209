"""Test-wide settings. Fixtures live in tests/fixtures/<area>.py, one module per package."""

from __future__ import annotations

import os
from pathlib import Path

import localray

# Local runs only ever talk to loopback (Ray's environment set before any test imports ray);
# DeepSpeed op builds cached in the repo.
localray.prepare(None)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

pytest_plugins = [
    "tests.fixtures.ingest",
    "tests.fixtures.model",
    "tests.fixtures.training",
    "tests.fixtures.eval",
    "tests.fixtures.localray",
]
