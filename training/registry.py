"""Export, log and register a trained model; resolve and load registered versions back.

Export: the DeepSpeed (ZeRO 1/2/3) checkpoint is consolidated into one fp32 state dict and
written in the ``scgpt_model.checkpoint.save_pretrained`` layout (model.pt, config.json,
vocab.json). That folder is logged as an MLflow pyfunc model (artifact ``model_dir``, explicit
``pip_requirements``) and registered as ``models:/<name>/<version>`` with lineage tags.

Load: ``load_registered_model(uri)`` accepts ``models:/<name>/<version>``,
``models:/<name>@<alias>``, ``models:/<name>/latest`` or a local folder (our layout, the
official scGPT layout, or a downloaded MLflow model folder).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version as pkg_version
from pathlib import Path
from typing import Any

from training.errors import ModelURIError

log = logging.getLogger(__name__)

ARTIFACT_KEY = "model_dir"  # the save_pretrained folder inside the MLflow model's artifacts
# beside model.pt: what the model was pretrained on (shard-set manifest hash, source datasets), so
# that evaluation can warn when it scores a model on cells it has seen
LINEAGE_FILE = "lineage.json"


def lineage_of(manifest) -> dict[str, Any]:
    """The lineage record of a model pretrained on ``manifest`` (a ``shardset.Manifest``)."""
    return {"manifest_hash": manifest.hash(), "source": manifest.source, "obs_filter": manifest.obs_filter,
            "datasets": [d.to_dict() for d in manifest.datasets]}


def read_lineage(model_dir: str | Path) -> dict[str, Any] | None:
    f = Path(model_dir) / LINEAGE_FILE
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s); the model's pretraining data is unknown", f, e)
        return None
# registered versions this process downloaded: (tracking URI, name, version) -> temporary folder.
# A version's files never change, so a second load reuses the folder; all are removed at exit
# (the loaded model is in memory, but info["path"] is read after loading, e.g. for modality tables).
_DOWNLOADS: dict[tuple[str, str, int], tuple[Path, Path]] = {}  # -> (temporary folder, model inside it)


def remove_downloads() -> None:
    """Delete every model folder this process downloaded (also run at interpreter exit)."""
    while _DOWNLOADS:
        _, (d, _) = _DOWNLOADS.popitem()
        shutil.rmtree(d, ignore_errors=True)


atexit.register(remove_downloads)
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


def consolidated_state_dict(checkpoint_dir: str | Path) -> dict:
    """fp32 state dict from a DeepSpeed ZeRO checkpoint (any stage, any world size)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from training.worker import DS_TAG

    sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=DS_TAG)
    # the engine wraps the network in training.parallelize.LossModule: drop its "model." prefix
    return {k.removeprefix("model."): v.detach().float().clone() for k, v in sd.items()}


def export_pretrained(checkpoint_dir: str | Path, mcfg, vocab, out_dir: str | Path,
                      lineage: dict[str, Any] | None = None) -> Path:
    """DeepSpeed checkpoint -> save_pretrained folder (model.pt fp32 + config.json + vocab.json,
    and ``lineage.json`` when ``lineage`` is given)."""
    from scgpt_model.checkpoint import save_pretrained
    from scgpt_model.model import ScGPT

    model = ScGPT(mcfg)
    sd = consolidated_state_dict(checkpoint_dir)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # buffers are not in ZeRO's fp32 groups; they are re-created by the constructor
    params = {n for n, _ in model.named_parameters()}
    if set(missing) & params or unexpected:
        raise RuntimeError(f"consolidated checkpoint does not fit the model: missing {sorted(set(missing) & params)[:5]}, "
                           f"unexpected {unexpected[:5]}")
    out = save_pretrained(model, vocab, out_dir)
    if lineage is not None:
        (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1, sort_keys=True))
    return out


def pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("torch", "numpy", "pandas", "pyarrow", "mlflow"):
        try:
            reqs.append(f"{pkg}=={pkg_version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def export_and_register(checkpoint_dir: str | Path, mcfg, vocab, *, tracking_uri: str, run_id: str,
                        model_name: str, tags: dict[str, str], lineage: dict[str, Any] | None = None) -> str:
    """Export, log as an MLflow model in ``run_id``, register; returns ``models:/<name>/<version>``."""
    import mlflow

    from training.pyfunc_model import ScGPTPyfunc

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    pkg_root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="scgpt-export-") as tmp:
        model_dir = export_pretrained(checkpoint_dir, mcfg, vocab, Path(tmp) / ARTIFACT_KEY, lineage)
        # the fluent API refuses to re-open a run outside the process's active experiment (a caller
        # may have called set_experiment for something else): make the run's own experiment active
        mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            # the exported folder also as plain run artifacts (eval and users can fetch it without pyfunc)
            mlflow.log_artifacts(str(model_dir), artifact_path="pretrained")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=ScGPTPyfunc(), artifacts={ARTIFACT_KEY: str(model_dir)},
                pip_requirements=pip_requirements(),
                code_paths=[str(pkg_root / "scgpt_model"), str(pkg_root / "training")],
            )
    mv = mlflow.register_model(info.model_uri, model_name, tags=tags)
    uri = f"models:/{model_name}/{mv.version}"
    log.info("registered %s (run %s)", uri, run_id)
    return uri


# ---------------------------------------------------------------------------------------------
def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Where a model URI points: a dict with ``kind`` ('registry' or 'local') and its coordinates.

    Registry: model_name, version, run_id, tags, source; local: path. Raises ModelURIError.
    """
    from training.tracking import resolve_tracking_uri

    if not uri.startswith("models:/"):
        p = Path(uri).expanduser()
        if p.is_dir():
            return {"kind": "local", "path": str(p.resolve()), "model_name": None, "version": None}
        raise ModelURIError(f"model {uri!r} is neither a models:/<name>/<version> URI nor an existing folder")
    m = _URI.match(uri)
    if not m:
        raise ModelURIError(f"model URI {uri!r} is malformed; use models:/<name>/<version>, models:/<name>@<alias> "
                            "or models:/<name>/latest")
    from mlflow.exceptions import MlflowException

    from training.errors import TrainUsageError
    from training.tracking import check_tracking_uri, client, sqlite_path

    turi = resolve_tracking_uri(tracking_uri)
    db = sqlite_path(turi)
    if db is not None and not db.exists():  # MLflow would create an empty database there and find nothing
        raise ModelURIError(
            f"model URI {uri!r}: no MLflow database at {db} (tracking URI {turi}); point at the database the "
            "model was registered in: --tracking-uri sqlite:///<folder>/mlflow.db (Python: tracking_uri=...) or "
            "export MLFLOW_TRACKING_URI=sqlite:///<folder>/mlflow.db; the main job's is "
            "sqlite:///$PWD/demo_out/mlflow.db")
    try:
        check_tracking_uri(turi)
    except TrainUsageError as e:
        raise ModelURIError(str(e)) from None
    c = client(turi)
    name = m["name"]
    try:
        if m["alias"]:
            mv = c.get_model_version_by_alias(name, m["alias"])
        elif m["version"] == "latest":
            versions = c.search_model_versions(f"name='{name}'")
            if not versions:
                raise ModelURIError(f"registered model {name!r} has no versions in {turi}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            if not m["version"].isdigit():
                raise ModelURIError(f"model URI {uri!r}: version must be a number, 'latest' or @alias")
            mv = c.get_model_version(name, m["version"])
    except MlflowException as e:
        known = sorted({rm.name for rm in c.search_registered_models()})
        raise ModelURIError(f"model URI {uri!r} does not resolve in {turi} ({e.message.splitlines()[0]}); "
                            f"registered models there: {known or 'none'}") from e
    return {"kind": "registry", "model_name": name, "version": int(mv.version), "run_id": mv.run_id,
            "tags": dict(mv.tags or {}), "source": mv.source, "tracking_uri": turi,
            "manifest_hash": (mv.tags or {}).get("manifest_hash"), "census_source": (mv.tags or {}).get("census_source")}


def _local_model_dir(path: Path) -> Path:
    """Our layout directly, or inside a downloaded MLflow model folder (artifacts/model_dir)."""
    for cand in (path, path / "artifacts" / ARTIFACT_KEY, path / ARTIFACT_KEY):
        if (cand / "model.pt").exists() or (cand / "args.json").exists():
            return cand
    return path


def load_registered_model(uri: str, tracking_uri: str | None = None, map_location: str = "cpu"):
    """(ScGPT, GeneVocab, ModelConfig, info) for a registered version or a local folder."""
    from scgpt_model.checkpoint import load_pretrained

    where = resolve_model_uri(uri, tracking_uri)
    if where["kind"] == "local":
        path = _local_model_dir(Path(where["path"]))
        info = {"model_name": None, "version": None, "run_id": None, "manifest_hash": None, "source": None,
                "path": str(path), "uri": uri}
    else:
        import mlflow

        mlflow.set_tracking_uri(where["tracking_uri"])
        mlflow.set_registry_uri(where["tracking_uri"])  # models:/ downloads go through the registry
        ver_uri = f"models:/{where['model_name']}/{where['version']}"
        key = (where["tracking_uri"], where["model_name"], where["version"])
        if key in _DOWNLOADS and _DOWNLOADS[key][1].is_dir():
            local = _DOWNLOADS[key][1]
        else:
            dest = Path(tempfile.mkdtemp(prefix="scgpt-model-"))
            # one line per downloaded file otherwise, dozens per model load, on every evaluate
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ver_uri, dst_path=str(dest),
                                                                 tracking_uri=where["tracking_uri"]))
            except Exception as e:  # artifact store unreachable or files gone
                shutil.rmtree(dest, ignore_errors=True)
                raise ModelURIError(f"model {ver_uri}: cannot download its files ({e})") from e
            _DOWNLOADS[key] = (dest, local)
        path = _local_model_dir(local)
        info = {"model_name": where["model_name"], "version": where["version"], "run_id": where["run_id"],
                "manifest_hash": where["manifest_hash"], "source": where["census_source"], "tags": where["tags"],
                "path": str(path), "uri": ver_uri}
    try:
        model, vocab, cfg = load_pretrained(path, map_location=map_location)
    except Exception as e:
        raise ModelURIError(f"model {uri!r}: {path} does not hold a loadable checkpoint ({e})") from e
    info["lineage"] = read_lineage(path)
    model.eval()
    return model, vocab, cfg, info
