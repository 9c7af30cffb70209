"""Typed configuration of a pretraining run, its presets, and YAML loading.

A run is one :class:`TrainConfig` with nested parts (model, data, optim, deepspeed, schedule,
tracking, cluster). Presets are functions returning a config; a YAML file names a preset (or
not) and overrides any field; unknown keys are refused with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from training.errors import TrainUsageError

Precision = Literal["auto", "fp32", "bf16"]
Optimizer = Literal["torch", "cpu_adam", "fused_adam"]
ZERO_STAGES = (1, 2, 3)


@dataclass(kw_only=True)
class ModelSection:
    preset: str = "debug"  # a scgpt_model preset name: debug | cpu | small | base
    # Extra ModelConfig fields for get_preset(preset, vocab_size, **overrides), e.g. {"dropout": 0.0}.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class DataConfig:
    shards: str = ""  # output folder of `ingest census` (vocab.json, manifest.json, shards/)
    batch_size: int = 32  # cells per worker per micro-batch (the reference used 32 per GPU)
    # Length bucketing: cells of this many consecutive micro-batches are sorted by length and
    # re-cut, so a batch holds cells of similar length (padding stays small) while the order
    # between windows stays shuffled. 32 batches of 32 cells keeps padding near 5% on Census.
    bucket_window: int = 32
    # Block shuffle: each epoch the shard order is permuted and the cells of every group of this
    # many consecutive shards are permuted together, so a batch mixes cells of many shards (and
    # datasets: a shard is one contiguous joinid chunk) while a worker keeps only this many
    # decoded shards in memory. Larger is closer to a full per-cell shuffle.
    shuffle_shards: int = 8
    unknown_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)  # paper §4.3.2
    max_train_cells: int | None = None  # quick runs: the first N training cells (by shuffled order of epoch 0)
    val_max_cells: int = 1024  # validation cells scored at each validation (a fixed subset)
    prefetch_batches: int = 4  # batches collated ahead by a background thread
    record_seen: bool = False  # audit: each rank writes the soma_joinids it trained on per epoch


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-4  # paper §4.3.2 / reference pretraining
    weight_decay: float = 0.0  # the reference used plain Adam
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warmup (optimizer steps), then cosine decay
    min_lr_ratio: float = 0.1  # decay floor as a fraction of lr
    grad_clip: float = 1.0  # global grad-norm clipping, done by DeepSpeed
    grad_accum: int = 1  # micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)


@dataclass(kw_only=True)
class DeepSpeedSection:
    zero_stage: int = 2  # 1: optimizer states, 2: + gradients, 3: + parameters sharded
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # torch: torch.optim.AdamW (no compiled ops; works everywhere). cpu_adam / fused_adam build
    # DeepSpeed's ops with ninja into TORCH_EXTENSIONS_DIR on first use.
    optimizer: Optimizer = "torch"
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer states to CPU (with cpu_adam)


@dataclass(kw_only=True)
class ScheduleConfig:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when reached
    checkpoint_every: int = 200  # optimizer steps between checkpoints (plus one at the end)
    val_every: int = 200  # optimizer steps between validation losses (plus one at the end)
    seed: int = 0  # data order, masking, dropout and init all derive from it
    step_sleep_s: float = 0.0  # testing aid: sleep after each step so a kill lands mid-run


@dataclass(kw_only=True)
class TrackingConfig:
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "scgpt-pretrain"
    model_name: str = "scgpt-debug"  # registered model name: models:/<model_name>/<version>
    register: bool = True


@dataclass(kw_only=True)
class ClusterConfig:
    num_workers: int = 2
    use_gpu: bool = False
    ray_address: str | None = None  # None: start a local Ray on loopback
    cpus_per_worker: float = 1.0
    peak_tflops: float = 989.0  # per-GPU dense bf16 peak for MFU (H100/H200 SXM: 989 TFLOP/s)
    storage_path: str = "runs/train"  # Ray Train storage (checkpoints); shared FS or s3:// on clusters
    run_name: str | None = None  # default: <model_name>-<UTC timestamp>


@dataclass(kw_only=True)
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        cfg = cls()
        apply_overrides(cfg, d, where="config")
        return cfg

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (for MLflow params)."""
        out: dict[str, Any] = {}
        for sec, vals in self.to_dict().items():
            for k, v in vals.items():
                if isinstance(v, dict):
                    for k2, v2 in v.items():
                        out[f"{sec}.{k}.{k2}"] = v2
                else:
                    out[f"{sec}.{k}"] = v
        return out


# presets ------------------------------------------------------------------------------------
def debug() -> TrainConfig:
    """Seconds on a laptop CPU: tiny model, small batches, frequent checkpoints."""
    cfg = TrainConfig()
    cfg.model.preset = "debug"
    cfg.data.batch_size = 16
    cfg.data.bucket_window = 8
    cfg.data.val_max_cells = 128
    cfg.optim.lr = 1e-3  # a tiny model tolerates (and needs, for a visible drop in a few steps) more
    cfg.optim.warmup_steps = 2
    cfg.schedule.checkpoint_every = 20
    cfg.schedule.val_every = 20
    cfg.tracking.model_name = "scgpt-debug"
    return cfg


def cpu() -> TrainConfig:
    """The laptop recipe: about 10 minutes on 2 CPU cores (2 workers x 1 core) over the demo
    atlas's PBMCs, and a model whose held-out GEP loss beats the trivial predictors."""
    cfg = TrainConfig()
    cfg.model.preset = "cpu"
    cfg.data.batch_size = 32
    cfg.data.val_max_cells = 256
    cfg.optim.lr = 1e-3  # a 128-wide model (the 1e-4 of the paper is for 512 wide, 12 layers)
    cfg.optim.weight_decay = 0.01
    cfg.optim.warmup_steps = 30
    cfg.schedule.epochs = 8
    cfg.schedule.max_steps = 600
    cfg.schedule.checkpoint_every = 100
    cfg.schedule.val_every = 100
    cfg.tracking.model_name = "scgpt-cpu"
    return cfg


def small() -> TrainConfig:
    """Minutes on CPU, the benchmark workload."""
    cfg = TrainConfig()
    cfg.model.preset = "small"
    cfg.data.batch_size = 32
    cfg.optim.lr = 3e-4
    cfg.optim.warmup_steps = 50
    cfg.tracking.model_name = "scgpt-small"
    return cfg


def base() -> TrainConfig:
    """The paper's whole-human setting (51M params, 1200 genes/cell): GPU, bf16, ZeRO-2."""
    cfg = TrainConfig()
    cfg.model.preset = "base"
    cfg.data.batch_size = 32
    cfg.optim.lr = 1e-4
    cfg.optim.warmup_steps = 1000
    cfg.schedule.epochs = 6  # paper §4.3.2: 6 epochs over 33M cells
    cfg.schedule.checkpoint_every = 2000
    cfg.schedule.val_every = 2000
    cfg.tracking.model_name = "scgpt-base"
    return cfg


PRESETS: dict[str, Callable[[], TrainConfig]] = {"debug": debug, "cpu": cpu, "small": small, "base": base}


# overrides and YAML ---------------------------------------------------------------------------
def _known_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            keys += _known_keys(v, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _expected(tp: Any) -> str:
    """A type annotation in words, for messages: 'a number', 'a list of 2 numbers', ..."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_expected(a) for a in inner) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_expected(args[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or tp is dict:
        return "a mapping (key: value)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _bool_for_number(value: Any, tp: Any) -> bool:
    """True where a YAML true/false stands in a numeric slot (which pydantic's lax mode would take as 1/0)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return all(_bool_for_number(value, a) for a in args if a is not type(None))
    if origin is tuple and isinstance(value, (list, tuple)):
        elems = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        return any(_bool_for_number(v, t) for v, t in zip(value, elems))
    return isinstance(value, bool) and tp in (int, float)


def coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """``value`` converted to the annotation ``tp`` (int/float/bool/str, X | None, Literal, tuple,
    dict), or TrainUsageError naming the dotted ``key`` and the expected type.

    pydantic's lax mode does the conversion, so what PyYAML leaves as a string parses as the
    field's type (``lr: 1e-4`` is the string '1e-4' in YAML 1.1) and a list becomes a tuple;
    true/false is refused where a number belongs, and floats must be finite."""
    from pydantic import TypeAdapter, ValidationError

    bad = TrainUsageError(f"{where}: '{key}' must be {_expected(tp)}, got {value!r} ({type(value).__name__})")
    if _bool_for_number(value, tp):
        raise bad
    try:
        out = TypeAdapter(tp).validate_python(value)
    except ValidationError:
        raise bad from None
    flat = out if isinstance(out, tuple) else (out,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in flat):
        raise bad
    return out


def _coerce_fields(cls: type, values: Any, key: str, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A mapping of ``cls``'s fields (nested dataclasses as mappings), each value coerced."""
    if not isinstance(values, dict):
        raise TrainUsageError(f"{where}: '{key}' must be a mapping of {cls.__name__} fields, got {values!r} "
                              f"({type(values).__name__})")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    out = {}
    for k, v in values.items():
        if k not in names:
            raise TrainUsageError(f"{where}: unknown key '{key}.{k}'. Known keys: {', '.join(names)}")
        tp = hints[k]
        out[k] = (_coerce_fields(tp, v, f"{key}.{k}", where) if dataclasses.is_dataclass(tp)
                  else coerce(v, tp, f"{key}.{k}", where))
    return out


def apply_overrides(obj: Any, values: dict[str, Any], *, where: str, prefix: str = "") -> None:
    """Set nested dataclass fields from a (nested) dict, each value coerced to its field's type;
    unknown keys and values of the wrong type raise TrainUsageError naming the dotted key."""
    names = {f.name for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise TrainUsageError(
                f"{where}: unknown config key '{dotted}'. Known keys: {', '.join(_known_keys(obj, prefix))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise TrainUsageError(f"{where}: '{dotted}' must be a mapping of its fields, got {value!r}")
            apply_overrides(current, value, where=where, prefix=f"{dotted}.")
        elif dotted == "model.overrides":  # ModelConfig fields: typed by scgpt_model's dataclass
            from scgpt_model.config import ModelConfig

            # vocab_size comes from the shard set's vocabulary, never from the config
            setattr(obj, key, _coerce_fields(ModelConfig, value, dotted, where, skip=("vocab_size",)))
        else:
            setattr(obj, key, coerce(value, hints[key], dotted, where))


def load_config(spec: str) -> TrainConfig:
    """A preset name (``debug``/``small``/``base``) or a YAML file (optionally ``preset: <name>``)."""
    if spec in PRESETS:
        return PRESETS[spec]()
    path = Path(spec)
    if not path.suffix.lower() in (".yaml", ".yml", ".json") or not path.exists():
        raise TrainUsageError(
            f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainUsageError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise TrainUsageError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    preset = data.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise TrainUsageError(f"config file {path}: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]() if preset else TrainConfig()
    apply_overrides(cfg, data, where=f"config file {path}")
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Range checks that do not need the data or the cluster."""
    problems = []
    if cfg.deepspeed.zero_stage not in (1, 2, 3):
        problems.append(f"deepspeed.zero_stage must be 1, 2 or 3 (got {cfg.deepspeed.zero_stage})")
    if cfg.deepspeed.precision not in ("auto", "fp32", "bf16"):
        problems.append(f"deepspeed.precision must be auto, fp32 or bf16 (got {cfg.deepspeed.precision!r})")
    if cfg.deepspeed.optimizer not in ("torch", "cpu_adam", "fused_adam"):
        problems.append(f"deepspeed.optimizer must be torch, cpu_adam or fused_adam (got {cfg.deepspeed.optimizer!r})")
    for name, v in (("data.batch_size", cfg.data.batch_size), ("optim.grad_accum", cfg.optim.grad_accum),
                    ("schedule.epochs", cfg.schedule.epochs), ("cluster.num_workers", cfg.cluster.num_workers),
                    ("schedule.checkpoint_every", cfg.schedule.checkpoint_every),
                    ("schedule.val_every", cfg.schedule.val_every), ("data.bucket_window", cfg.data.bucket_window),
                    ("data.shuffle_shards", cfg.data.shuffle_shards), ("data.val_max_cells", cfg.data.val_max_cells),
                    ("data.prefetch_batches", cfg.data.prefetch_batches)):
        if not isinstance(v, int) or v < 1:
            problems.append(f"{name} must be a positive integer (got {v!r})")
    for name, v in (("schedule.max_steps", cfg.schedule.max_steps), ("data.max_train_cells", cfg.data.max_train_cells)):
        if v is not None and v < 1:
            problems.append(f"{name} must be >= 1, or null for no limit (got {v})")
    for name, v, ok, rule in (
            ("optim.lr", cfg.optim.lr, cfg.optim.lr > 0, "> 0"),
            ("optim.eps", cfg.optim.eps, cfg.optim.eps > 0, "> 0"),
            ("optim.weight_decay", cfg.optim.weight_decay, cfg.optim.weight_decay >= 0, ">= 0"),
            ("optim.warmup_steps", cfg.optim.warmup_steps, cfg.optim.warmup_steps >= 0, ">= 0"),
            ("optim.min_lr_ratio", cfg.optim.min_lr_ratio, 0 <= cfg.optim.min_lr_ratio <= 1, "in [0, 1]"),
            ("optim.grad_clip", cfg.optim.grad_clip, cfg.optim.grad_clip >= 0, ">= 0 (0: no clipping)"),
            ("optim.betas", cfg.optim.betas, all(0 <= b < 1 for b in cfg.optim.betas), "in [0, 1) each"),
            ("cluster.cpus_per_worker", cfg.cluster.cpus_per_worker, cfg.cluster.cpus_per_worker > 0, "> 0"),
            ("cluster.peak_tflops", cfg.cluster.peak_tflops, cfg.cluster.peak_tflops > 0, "> 0"),
            ("schedule.step_sleep_s", cfg.schedule.step_sleep_s, cfg.schedule.step_sleep_s >= 0, ">= 0")):
        if not ok:
            problems.append(f"{name} must be {rule} (got {v})")
    if not cfg.data.unknown_ratios or not all(0 < r < 1 for r in cfg.data.unknown_ratios):
        problems.append(f"data.unknown_ratios must lie in (0, 1) (got {cfg.data.unknown_ratios})")
    if cfg.deepspeed.precision == "bf16" and cfg.deepspeed.optimizer == "fused_adam" and not cfg.cluster.use_gpu:
        problems.append("deepspeed.optimizer fused_adam needs --use-gpu; use 'torch' or 'cpu_adam' on CPU")
    if problems:
        raise TrainUsageError("invalid config: " + "; ".join(problems))
