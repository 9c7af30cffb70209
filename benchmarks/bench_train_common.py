"""Shared helpers of the training benchmarks: demo shards on demand, the results file."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "training.md"
BIN = Path(sys.executable).parent


def ensure_demo_shards(root: Path = Path("/tmp/scgpt-bench")) -> Path:
    """The demo atlas' blood shards (`ingest build-demo` + `ingest census --tissue blood`), built once."""
    shards = root / "shards_blood"
    if (shards / "manifest.json").exists():
        return shards
    env = dict(os.environ)  # Ray's settings: ingest sets them itself (localray.prepare)
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([BIN / "ingest", "build-demo", "--out", str(root / "census")], check=True, env=env)
    subprocess.run([BIN / "ingest", "census", "--census-uri", str(root / "census"), "--tissue", "blood",
                    "--out", str(shards)], check=True, env=env)
    return shards


def machine() -> str:
    return f"{os.cpu_count()}-core CPU (shared with other jobs), no GPU, torch {__import__('torch').__version__}"


def write_section(title: str, command: str, lines: list[str]) -> None:
    """Replace (or append) the '## title' section of benchmarks/results/training.md."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    text = RESULTS.read_text() if RESULTS.exists() else "# Training benchmarks\n"
    body = "\n".join([f"## {title}", "", f"Command: `{command}`  ", f"Machine: {machine()}  ",
                      f"Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "", *lines, ""])
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(body + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    RESULTS.write_text(text)
