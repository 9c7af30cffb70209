"""MLflow logging of evaluations, each run linked to the model version it scored.

One run per (task, dataset); ``evaluate suite`` opens a parent run and nests them. Every run
carries the tags ``model_name``, ``model_version``, ``source_run_id`` and ``model_uri``; when the
model is a registered version, the version gets a tag ``eval.<task>.<dataset>`` = run id back, so
the registry page lists its evaluations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from eval.report import TaskResult

log = logging.getLogger(__name__)

EXPERIMENT = "scgpt-eval"


def _metric_key(*parts: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and spaces
    return "/".join(re.sub(r"[^A-Za-z0-9_.\- ]", "_", p) for p in parts)


def model_tags(info: dict) -> dict[str, str]:
    keys = {"model_name": "model_name", "version": "model_version", "run_id": "source_run_id",
            "uri": "model_uri", "manifest_hash": "data_manifest_hash", "source": "data_source"}
    return {tag: str(info[k]) for k, tag in keys.items() if info.get(k) not in (None, "")}


@contextmanager
def eval_run(tracking_uri: str, run_name: str, info: dict, *, nested: bool = False,
             experiment: str = EXPERIMENT, extra_tags: dict | None = None) -> Iterator[str]:
    """Start (and end) an MLflow run tagged with the model's identity; yields the run id."""
    import mlflow

    from training.tracking import ensure_experiment

    mlflow.set_tracking_uri(tracking_uri)
    # created with an artifact location beside a sqlite database (not ./mlruns of the cwd)
    mlflow.set_experiment(experiment_id=ensure_experiment(tracking_uri, experiment))
    tags = {**model_tags(info), **(extra_tags or {})}
    with mlflow.start_run(run_name=run_name, nested=nested, tags=tags) as run:
        yield run.info.run_id


def log_result(result: TaskResult, outdir: Path, info: dict, tracking_uri: str) -> None:
    """Log scores, params, the score table (CSV + Markdown) and every artifact to the active run."""
    import mlflow

    run = mlflow.active_run()
    assert run is not None, "log_result needs an active MLflow run"
    outdir.mkdir(parents=True, exist_ok=True)
    stem = f"scores_{result.task}_{result.dataset}"
    csv, md = outdir / f"{stem}.csv", outdir / f"{stem}.md"
    result.table.to_csv(csv)
    md.write_text(result.markdown() + "\n")
    metrics = {}
    for method, row in result.table.iterrows():
        for metric, v in row.items():
            if v is not None and np.isfinite(v):
                metrics[_metric_key(str(method), str(metric))] = float(v)
    mlflow.log_metrics(metrics)
    mlflow.log_params({k: str(v)[:500] for k, v in result.params.items()})
    for p in [csv, md, *result.artifacts]:
        mlflow.log_artifact(str(p), artifact_path=result.task)
    link_version(info, f"eval.{result.task}.{result.dataset}", run.info.run_id, tracking_uri)


def link_version(info: dict, key: str, run_id: str, tracking_uri: str) -> None:
    """Tag the registered model version with the evaluation run (no-op for a local folder)."""
    if not info.get("model_name") or not info.get("version"):
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=tracking_uri).set_model_version_tag(
            str(info["model_name"]), str(info["version"]), key, run_id)
    except Exception as e:  # noqa: BLE001 (the run is still complete; the back-link is a convenience)
        log.warning("could not tag model version %s/%s: %s", info["model_name"], info["version"], e)
