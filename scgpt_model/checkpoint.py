"""Save / load checkpoints: our layout, and import of the official scGPT release layout.

Our layout (``save_pretrained``): ``model.pt`` (consolidated fp32 state dict), ``config.json``
(``ModelConfig.to_dict()`` plus a format tag), ``vocab.json`` (GeneVocab).

Official layout (``args.json``, ``best_model.pt``, ``vocab.json`` = ``{token: id}`` with keys not
in id order). Its parameter names come from the reference ``TransformerModel``: attention as
flash-attn's ``self_attn.Wqkv`` or torch's ``self_attn.in_proj_weight`` (same q/k/v stacking),
``encoder.enc_norm``, ``decoder.fc.*``, ``mvc_decoder.*``, ``cls_decoder._decoder.*`` ... Its
args.json lacks settings the official code hard-codes (post-norm, ReLU, gene LayerNorm, value
clamp 512, <cls> fed with pad_value); those are set here. Rows of the gene embedding are
permuted because our vocabulary puts the special tokens first.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scgpt_model.config import ModelConfig, ObjectiveConfig
from scgpt_model.model import ScGPT
from scgpt_model.schema import SPECIAL_TOKENS
from scgpt_model.vocab import GeneVocab, VocabError

logger = logging.getLogger(__name__)

FORMAT = "scgpt-census-model/1"
OFFICIAL_FILES = ("args.json", "best_model.pt", "vocab.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the fix."""


@dataclass
class ImportReport:
    """What an official import did: keys mapped, keys that did not map, our params left at init."""

    mapped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)  # official keys with no place in this model
    missing: list[str] = field(default_factory=list)  # our parameters the checkpoint did not set
    missing_tokens: list[str] = field(default_factory=list)  # special tokens absent from the official vocab

    def summary(self) -> str:
        return (f"{len(self.mapped)} tensors mapped, {len(self.unmapped)} unmapped "
                f"{self.unmapped[:8]}, {len(self.missing)} left at init {self.missing[:8]}")


# ----------------------------------------------------------------------------------------------
def save_pretrained(model: ScGPT, vocab: GeneVocab, dirpath: str | Path) -> Path:
    """Write model.pt (fp32, consolidated), config.json and vocab.json; atomic per file."""
    if len(vocab) != model.cfg.vocab_size:
        raise CheckpointError(f"vocabulary has {len(vocab)} tokens but the model was built for "
                              f"{model.cfg.vocab_size}; save the vocabulary the model was trained with")
    d = Path(dirpath)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    tmp = d / "model.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(d / "model.pt")
    cfg = {"format": FORMAT, **model.cfg.to_dict()}
    (d / "config.json.tmp").write_text(json.dumps(cfg, indent=2))
    (d / "config.json.tmp").replace(d / "config.json")
    vocab.save(d / "vocab.json")
    return d


def load_pretrained(dirpath: str | Path, map_location: str | torch.device = "cpu",
                    **overrides) -> tuple[ScGPT, GeneVocab, ModelConfig]:
    """Load our layout or the official scGPT layout; ``overrides`` edit the config (e.g. dropout)."""
    d = Path(dirpath)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint folder {d} does not exist")
    if (d / "config.json").exists() and (d / "model.pt").exists():
        raw = json.loads((d / "config.json").read_text())
        if raw.pop("format", FORMAT) != FORMAT:
            raise CheckpointError(f"{d}/config.json is not a {FORMAT} config")
        cfg = ModelConfig.from_dict(raw)
        if overrides:
            cfg = cfg.replace(**overrides)
        vocab = GeneVocab.load(d / "vocab.json")
        if len(vocab) != cfg.vocab_size:
            raise CheckpointError(f"{d}: vocab.json has {len(vocab)} tokens, config says {cfg.vocab_size}")
        model = ScGPT(cfg)
        state = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        load_compatible(model, state, strict=not overrides)
        return model.to(map_location), vocab, cfg
    if all((d / f).exists() for f in OFFICIAL_FILES):
        model, vocab, cfg, report = import_official(d, map_location=map_location, **overrides)
        return model, vocab, cfg
    raise CheckpointError(f"{d} is neither our checkpoint layout (model.pt, config.json, vocab.json) nor the "
                          f"official scGPT layout ({', '.join(OFFICIAL_FILES)})")


HEAD_PREFIXES = ("expr_head.", "gepc_head.", "cls_head.", "dar_head.", "depth_gep.", "depth_gepc.", "depth_head.")


def load_compatible(model: ScGPT, state: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Load ``state`` into ``model``; returns the parameters left at their init.

    ``strict=False`` (fine-tuning overrides): parameters the state lacks (a new head, e.g. from
    ``n_cell_types``) keep their init, and a head whose input width changed (batch/modality
    concatenation switched on) is re-initialised with a warning. A shape mismatch anywhere else is
    an error: the override changed the trunk, and the pretrained weights cannot be used.
    """
    ours = model.state_dict()
    mismatch = [k for k, v in state.items() if k in ours and v.shape != ours[k].shape]
    trunk = [k for k in mismatch if strict or not k.startswith(HEAD_PREFIXES)]
    if trunk:
        bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}" for k in trunk[:3]]
        raise CheckpointError(f"checkpoint tensors do not fit the model config ({bad}); an override "
                              "changed the size of an existing layer")
    if mismatch:
        logger.warning("re-initialising heads whose shape changed: %s", mismatch)
        state = {k: v for k, v in state.items() if k not in mismatch}
    unexpected = sorted(set(state) - set(ours))
    new = sorted(set(ours) - set(state))
    if strict and (new or unexpected):
        raise CheckpointError(f"checkpoint does not match its config: missing {new[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v for k, v in state.items() if k in ours}, strict=False)
    if new:
        logger.info("parameters not in the checkpoint, left at init (new heads): %s", new)
    if unexpected:
        logger.info("checkpoint parameters dropped by the config overrides: %s", unexpected)
    return new


# ----------------------------------------------------------------------------------------------
# official layout
# ----------------------------------------------------------------------------------------------
_RULES: list[tuple[str, str]] = [  # official name (regex) -> our name
    (r"encoder\.embedding\.weight", "gene_encoder.embedding.weight"),
    (r"encoder\.enc_norm\.(weight|bias)", r"gene_encoder.norm.\1"),
    (r"value_encoder\.(linear1|linear2|norm)\.(weight|bias)", r"value_encoder.\1.\2"),
    (r"flag_encoder\.weight", "flag_encoder.weight"),
    (r"pert_encoder\.weight", "condition_encoder.weight"),
    (r"batch_encoder\.embedding\.weight", "batch_encoder.embedding.weight"),
    (r"batch_encoder\.enc_norm\.(weight|bias)", r"batch_encoder.norm.\1"),
    (r"dsbn\.bns\.(\d+)\.(.+)", r"dsbn.bns.\1.\2"),
    (r"transformer_encoder\.layers\.(\d+)\.self_attn\.Wqkv\.(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"transformer_encoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", r"layers.\1.attn.qkv.\2"),
    (r"transformer_encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"layers.\1.attn.out.\2"),
    (r"transformer_encoder\.layers\.(\d+)\.(linear1|linear2|norm1|norm2)\.(weight|bias)", r"layers.\1.\2.\3"),
    (r"decoder\.fc\.(\d+)\.(weight|bias)", r"expr_head.fc.\1.\2"),
    (r"decoder\.zero_logit\.(\d+)\.(weight|bias)", r"expr_head.zero_logit.\1.\2"),
    (r"mvc_decoder\.(gene2query|W|W_zero_logit)\.(weight|bias)", r"gepc_head.\1.\2"),
    (r"cls_decoder\._decoder\.(\d+)\.(weight|bias)", r"cls_head.hidden.\1.\2"),
    (r"cls_decoder\.out_layer\.(weight|bias)", r"cls_head.out.\1"),
    (r"grad_reverse_discriminator\._decoder\.(\d+)\.(weight|bias)", r"dar_head.hidden.\1.\2"),
    (r"grad_reverse_discriminator\.out_layer\.(weight|bias)", r"dar_head.out.\1"),
]
_COMPILED = [(re.compile(p + r"$"), r) for p, r in _RULES]


def official_to_ours(name: str) -> str | None:
    """Our parameter name for an official one, or None when it has no counterpart."""
    name = name.removeprefix("module.")
    for pat, rep in _COMPILED:
        if pat.match(name):
            return pat.sub(rep, name)
    return None


def _official_config(args: dict, state: dict[str, torch.Tensor], vocab_size: int) -> ModelConfig:
    """Translate args.json + what the state dict contains into a ModelConfig of the released architecture."""
    def arg(*names, default=None):
        for n in names:
            if n in args and args[n] is not None:
                return args[n]
        return default

    d_model = int(arg("embsize", "d_model", "layer_size", default=state["encoder.embedding.weight"].shape[1]))
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer_encoder\.layers\.(\d+)\.", k))}
    n_layers = int(arg("nlayers", "n_layers", default=len(layers)))
    if layers and n_layers != len(layers):
        raise CheckpointError(f"args.json says {n_layers} layers but best_model.pt has {len(layers)}")
    ffn = state.get("transformer_encoder.layers.0.linear1.weight")
    style = arg("input_emb_style", default="continuous")
    if style not in ("continuous", "category"):
        raise CheckpointError(f"input_emb_style {style!r} cannot be imported (continuous or category only)")
    cls_w = state.get("cls_decoder.out_layer.weight")
    batch_w = state.get("batch_encoder.embedding.weight")
    dsbn_n = len({k.split(".")[2] for k in state if k.startswith("dsbn.bns.")})
    dab_w = state.get("grad_reverse_discriminator.out_layer.weight")
    n_batches = max(batch_w.shape[0] if batch_w is not None else 0, dsbn_n,
                    dab_w.shape[0] if dab_w is not None else 0)
    pert = state.get("pert_encoder.weight")
    gepc = "mvc_decoder.W.weight" in state
    objectives = ObjectiveConfig(gep=True, gep_loss="mse", gepc=gepc,
                                 ecs_beta=float(arg("ecs_thres", "ecs_threshold", default=0.6)),
                                 dar=dab_w is not None, cls=False)
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=int(arg("nheads", "nhead", "n_heads")),
        d_ffn=int(arg("d_hid", default=ffn.shape[0] if ffn is not None else d_model)),
        dropout=float(arg("dropout", default=0.2)), n_bins=int(arg("n_bins", default=51)),
        max_seq_len=int(arg("max_seq_len", default=1200)), pad_value=float(arg("pad_value", default=-2)),
        mask_value=float(arg("mask_value", default=-1)), value_encoding=style,
        # hard-coded in the official code, absent from args.json:
        value_max=512.0, gene_norm=True, activation="relu", layer_norm_eps=1e-5,
        norm_scheme="pre" if arg("pre_norm", default=False) else "post",
        n_conditions=pert.shape[0] if pert is not None else 0,
        n_batches=n_batches, use_batch_labels=batch_w is not None, dsbn=dsbn_n > 0,
        dsbn_affine=any(k.startswith("dsbn.bns.") and k.endswith(".weight") for k in state),
        n_cell_types=cls_w.shape[0] if cls_w is not None else 0,
        n_cls_layers=int(arg("n_layers_cls", "nlayers_cls", default=3)),
        explicit_zero_prob="decoder.zero_logit.0.weight" in state, objectives=objectives,
        reference_unknown_skip_out_proj=bool(arg("USE_GENERATIVE_TRAINING", "use_generative_training",
                                                 default=False)))


def import_official(dirpath: str | Path, map_location: str | torch.device = "cpu",
                    **overrides) -> tuple[ScGPT, GeneVocab, ModelConfig, ImportReport]:
    """Load an official scGPT checkpoint folder into :class:`ScGPT`, reporting what did not map."""
    d = Path(dirpath)
    try:
        args = json.loads((d / "args.json").read_text())
        mapping = json.loads((d / "vocab.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d}: cannot read args.json / vocab.json ({e})") from e
    if not (isinstance(mapping, dict) and all(isinstance(v, int) for v in mapping.values())):
        raise CheckpointError(f"{d}/vocab.json is not an official {{token: id}} mapping")
    try:
        vocab = GeneVocab.from_token_to_id(mapping)
    except VocabError as e:
        raise CheckpointError(f"{d}/vocab.json: {e}") from e
    state = torch.load(d / "best_model.pt", map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state_dict" in state:
        state = state["model_state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "encoder.embedding.weight" not in state:
        raise CheckpointError(f"{d}/best_model.pt has no encoder.embedding.weight: not an scGPT state dict")
    cfg = _official_config(args, state, len(vocab))
    if overrides:
        cfg = cfg.replace(**overrides)
    model = ScGPT(cfg)
    ours = model.state_dict()
    report = ImportReport()
    new_state: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        target = official_to_ours(name)
        if target is None or target not in ours:
            report.unmapped.append(name)
            continue
        if target == "gene_encoder.embedding.weight":
            t = _permute_embedding(t, mapping, vocab, ours[target], report)
        if t.shape != ours[target].shape:
            report.unmapped.append(f"{name} (shape {tuple(t.shape)} vs {tuple(ours[target].shape)})")
            continue
        new_state[target] = t.to(ours[target].dtype)
        report.mapped.append(name)
    report.missing = sorted(k for k in ours if k not in new_state and not k.endswith("num_batches_tracked"))
    model.load_state_dict(new_state, strict=False)
    logger.info("imported official checkpoint %s: %s", d, report.summary())
    if report.unmapped:
        logger.warning("official parameters not mapped: %s", report.unmapped)
    return model.to(map_location), vocab, cfg, report


def _permute_embedding(w: torch.Tensor, mapping: dict[str, int], vocab: GeneVocab, init: torch.Tensor,
                       report: ImportReport) -> torch.Tensor:
    """Rows in our id order: our id i takes official row mapping[token_i]."""
    if w.shape[0] != len(mapping) and w.shape[0] <= max(mapping.values()):
        raise CheckpointError(f"gene embedding has {w.shape[0]} rows but vocab.json has ids up to "
                              f"{max(mapping.values())}: the vocab does not belong to this checkpoint")
    out = init.clone().to(w.dtype)
    for i, tok in enumerate(vocab.tokens):
        if tok in mapping:
            out[i] = w[mapping[tok]]
        elif tok in SPECIAL_TOKENS:
            report.missing_tokens.append(tok)
    return out
