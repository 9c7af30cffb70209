"""MLflow for a training run: tracking URI, reachability check, run setup, per-step metrics.

The driver creates (or re-opens, on ``--resume``) the run and logs config and lineage; rank 0
of the workers logs per-step metrics into that run by id. Nothing here is called per rank > 0.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from training.errors import TrainUsageError

log = logging.getLogger(__name__)

# MLflow's own retries make an unreachable server hang for minutes; we check once, fast.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def resolve_tracking_uri(cli_value: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    if cli_value:
        return cli_value
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> None:
    """Fail fast (TrainUsageError) when the tracking store cannot be reached or written."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.parent.is_dir():
            raise TrainUsageError(f"tracking URI {uri}: folder {db.parent} does not exist; create it or "
                                  "pass --tracking-uri sqlite:///<existing folder>/mlflow.db")
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrainUsageError(f"tracking URI {uri}: {db} is not writable; pass another --tracking-uri")
        return
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 (user-given tracking server)
                if r.status >= 400:
                    raise TrainUsageError(f"tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise TrainUsageError(
                f"tracking server {uri} cannot be reached ({e}); start it (see infra/mlflow/README.md), "
                "fix --tracking-uri / MLFLOW_TRACKING_URI, or unset it to use a local sqlite database"
            ) from e
        return
    if uri.startswith("file:") or "://" not in uri:
        path = Path(uri[len("file:"):] if uri.startswith("file:") else uri)
        if not path.parent.exists():
            raise TrainUsageError(f"tracking URI {uri}: folder {path.parent} does not exist")
        return
    raise TrainUsageError(f"tracking URI {uri!r} has an unsupported scheme; use sqlite:///, http(s):// or a folder")


def git_commit() -> str:
    """HEAD of the checkout holding this package ('+dirty' when it has local changes), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(uri: str, experiment: str, run_name: str, *, params: dict[str, Any], tags: dict[str, str],
              artifacts: dict[str, Any]) -> str:
    """Create a run with params, tags and JSON artifacts; returns its id."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else c.create_experiment(experiment)
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict, tuple)) else str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        c.log_batch(run_id, params=items[i:i + 100])
    with tempfile.TemporaryDirectory() as d:
        for name, obj in artifacts.items():
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True))
            c.log_artifact(run_id, str(p))
    return run_id


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a resumed run RUNNING again (it stays the same run: same id, metrics continue)."""
    c = client(uri)
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


class MetricLogger:
    """Rank 0's per-step metrics into an existing run (one log_batch call per step)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.entities import Metric

        self._metric = Metric
        self.client = client(uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [self._metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=items)
