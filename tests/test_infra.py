"""infra/: the KubeRay, `ray up` and MLflow server files parse, and the job runs the real `train pretrain`."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"


def _load(rel: str) -> dict:
    docs = list(yaml.safe_load_all((INFRA / rel).read_text()))
    assert len(docs) == 1 and isinstance(docs[0], dict)
    return docs[0]


def _check_ray_cluster_spec(spec: dict) -> None:
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] and head["resources"]["limits"]["cpu"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing trains on the head
    (group,) = spec["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    gpus = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == int(group["rayStartParams"]["num-gpus"]) == 8
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert any(m["mountPath"] == "/data" for m in worker["volumeMounts"])
    assert spec["rayVersion"] == __import__("ray").__version__


def test_raycluster_parses():
    rc = _load("kuberay/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    _check_ray_cluster_spec(rc["spec"])


def test_rayjob_entrypoint_is_the_train_pretrain_command():
    from training.cli import build_parser, config_from_args

    job = _load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    _check_ray_cluster_spec(job["spec"]["rayClusterSpec"])
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["train", "pretrain"]
    args = build_parser().parse_args(argv[1:])
    cfg = config_from_args(args)
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert cfg.cluster.use_gpu and cfg.cluster.ray_address == "auto"
    assert cfg.cluster.num_workers == group["replicas"] * int(group["rayStartParams"]["num-gpus"])
    assert cfg.model.preset == "base" and cfg.deepspeed.zero_stage == 2 and cfg.deepspeed.precision == "bf16"
    assert cfg.data.shards.startswith("/data/") and cfg.cluster.storage_path.startswith("/data/")
    # the console script named in the entrypoint is the one pyproject installs
    import tomllib

    pyproject = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["train"] == "training.cli:main"


def test_ray_up_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load("ray-up/cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does first; raises on schema violations
    assert cfg["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert cfg["head_node_type"] == "head"


def test_mlflow_server_compose_has_database_and_artifact_store():
    comp = _load("mlflow/docker-compose.yaml")
    svc = comp["services"]
    assert {"mlflow", "postgres", "minio"} <= set(svc)
    cmd = svc["mlflow"]["command"]
    assert "--backend-store-uri postgresql://" in cmd and "--artifacts-destination s3://" in cmd
    assert "--serve-artifacts" in cmd and svc["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    assert "5000:5000" in svc["mlflow"]["ports"]
    readme = (INFRA / "README.md").read_text()
    assert "MLFLOW_TRACKING_URI" in readme and "--resume" in readme
