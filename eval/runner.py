"""Run tasks as MLflow runs linked to the model version; the suite nests them under one parent.

Every input is checked (``tasks.plan``) before a run is opened, so bad input leaves nothing
behind; a run that fails anyway is kept, marked FAILED with an ``error`` tag naming the
exception, so the evidence (params, partial artifacts) stays for whoever looks into it.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from eval import tasks
from eval.api import ScGPTModel
from eval.leakage import warn_if_pretrained_on
from eval.report import TaskResult
from eval.tracking import eval_run, log_result

log = logging.getLogger(__name__)


def _mark_failed(e: BaseException, *, interrupted: bool) -> None:
    """End the active run as FAILED (KILLED on Ctrl-C) with the exception in an ``error`` tag."""
    import mlflow

    try:
        mlflow.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
    except Exception as te:  # noqa: BLE001 (the status below matters more than the tag)
        log.warning("could not tag the failed run: %s", te)
    mlflow.end_run(status="KILLED" if interrupted else "FAILED")


def _run_logged(p: tasks.TaskInputs, model: ScGPTModel, opts: tasks.EvalOptions, tracking_uri: str,
                out: Path | None, nested: bool, seen: list[str]) -> TaskResult:
    with tempfile.TemporaryDirectory(prefix="scgpt-eval-") as tmp:
        outdir = (out if out is not None else Path(tmp)) / f"{p.task}_{p.dataset}"
        with eval_run(tracking_uri, f"{p.task}:{p.dataset}", model.info, nested=nested,
                      extra_tags={"eval_task": p.task, "eval_dataset": p.dataset}) as run_id:
            try:
                res = tasks.run(p, model, opts, outdir)
                if seen:
                    res.params["pretrained_on_eval_data"] = ", ".join(seen)
                log_result(res, outdir, model.info, tracking_uri)
            except BaseException as e:
                _mark_failed(e, interrupted=isinstance(e, KeyboardInterrupt))
                raise
        res.params["mlflow_run_id"] = run_id
    return res


def evaluate(model: ScGPTModel, task: str, dataset: str, opts: tasks.EvalOptions, *, tracking_uri: str,
             out: Path | None = None) -> TaskResult:
    """One task on one dataset, logged as one MLflow run."""
    p = tasks.plan(task, model, dataset, opts)
    seen = warn_if_pretrained_on(model.info, task, dataset)
    return _run_logged(p, model, opts, tracking_uri, out, nested=False, seen=seen)


def evaluate_suite(model: ScGPTModel, opts: tasks.EvalOptions, *, tracking_uri: str, out: Path | None = None,
                   suite: tuple[tuple[str, str], ...] = tasks.SUITE) -> tuple[str, list[TaskResult]]:
    """Every task on its default datasets: a parent run with one nested run per (task, dataset).

    Returns (parent run id, results)."""
    import mlflow

    plans = [tasks.plan(t, model, d, opts) for t, d in suite]  # all inputs checked up front
    seen = [warn_if_pretrained_on(model.info, t, d) for t, d in suite]
    results: list[TaskResult] = []
    with eval_run(tracking_uri, "suite", model.info, extra_tags={"eval_task": "suite"}) as parent:
        try:
            for i, (p, s) in enumerate(zip(plans, seen), 1):
                log.info("suite %d/%d: %s on %s", i, len(plans), p.task, p.dataset)
                results.append(_run_logged(p, model, opts, tracking_uri, out, nested=True, seen=s))
            mlflow.log_metric("suite_wall_s", sum(r.wall_s for r in results))
            from eval.report import combine_markdown

            mlflow.log_text(combine_markdown(results) + "\n", "scores_suite.md")
        except BaseException as e:
            _mark_failed(e, interrupted=isinstance(e, KeyboardInterrupt))
            raise
    return parent, results
