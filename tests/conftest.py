"""Test-wide settings. Fixtures live in tests/fixtures/<area>.py, one module per package."""

from __future__ import annotations

import os
from pathlib import Path

# Local runs only ever talk to loopback; Ray auth off; DeepSpeed op builds cached in the repo.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

pytest_plugins = [
    "tests.fixtures.ingest",
    "tests.fixtures.model",
    "tests.fixtures.training",
    "tests.fixtures.eval",
]
