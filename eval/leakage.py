"""Was the model pretrained on the cells it is being scored on?

A model trained by ``train pretrain`` carries ``lineage.json`` (``training.registry``): the shard
set's source datasets, each with its id and the file the store names for it. A dataset under
evaluation overlaps when its file name, or its name, matches one of those. Scores on such data
are not held-out scores (zero-shot embeddings and gene programmes especially), so the run says
so: a warning, a ``pretrained_on_eval_data`` param, and a line in the report.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def dataset_files(task: str, spec: str) -> tuple[str, set[str]]:
    """(name, file names) of an evaluation dataset spec, without loading it."""
    if task == "multiomic":
        from eval.multiomic_data import SHIPPED_FILES, SHIPPED_NAME

        if spec == SHIPPED_NAME:
            return spec, {f for _, f in SHIPPED_FILES}
        return Path(spec).stem, {Path(spec).name}
    from eval.data import SHIPPED

    if spec in SHIPPED:
        return spec, {SHIPPED[spec].file}
    return Path(spec).stem, {Path(spec).name}


def overlap(info: dict, task: str, spec: str) -> list[str]:
    """The ids of the model's pretraining datasets that are (in) the evaluation dataset."""
    lineage = (info or {}).get("lineage") or {}
    name, files = dataset_files(task, spec)
    hits = []
    for d in lineage.get("datasets", []):
        path = Path(str(d.get("h5ad_path") or "")).name
        if (path and path in files) or d.get("dataset_id") == name:
            hits.append(str(d.get("dataset_id")))
    return hits


def warn_if_pretrained_on(info: dict, task: str, spec: str) -> list[str]:
    """Log a warning (and return the dataset ids) when the model was pretrained on ``spec``."""
    hits = overlap(info, task, spec)
    if hits:
        log.warning("%s on %s: the model was pretrained on these cells (datasets %s in its lineage.json), so its "
                    "scores here are not held-out scores; evaluate on a dataset left out of pretraining (e.g. "
                    "ingest with --obs-filter \"dataset_id not in [...]\") for an honest comparison",
                    task, spec, ", ".join(hits))
    return hits
