"""Typed configuration of the scGPT network and its objectives.

Every default carries a comment saying where it comes from (paper section, released
checkpoint, or an engineering reason). Configs round-trip through plain dicts
(``to_dict`` / ``from_dict``) so that ``config.json`` inside a checkpoint is readable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from scgpt_model.schema import DEFAULT_N_BINS, PAD_ID, n_bins_problem

ValueEncoding = Literal["continuous", "category"]
NormScheme = Literal["post", "pre"]
Activation = Literal["relu", "gelu"]
AttentionBackend = Literal["auto", "sdpa", "flash"]
GepLoss = Literal["mse", "ce"]
EcsStyle = Literal["paper", "reference"]
CellEmbStyle = Literal["cls", "avg-pool"]


@dataclass(kw_only=True, slots=True)
class ObjectiveConfig:
    """Which objectives (§4.4) are on, and how they are weighted in ``LossOutput.total``."""

    gep: bool = True  # gene expression prediction on masked/unknown tokens (§4.4 eq. 10)
    gep_loss: GepLoss = "mse"  # "mse" on bin values as the reference code; "ce" over bins as eq. 10
    gep_weight: float = 1.0
    gepc: bool = True  # GEPC / "MVC": value = gene query . W cell embedding (eq. 11; a scalar, so MSE); on in the release
    gepc_weight: float = 1.0
    ecs: bool = False  # elastic cell similarity (eq. 12); fine-tuning for integration only
    ecs_beta: float = 0.6  # paper §4.8: beta = 0.6
    ecs_weight: float = 10.0  # paper §4.8: weight 10 when combined with other losses
    ecs_style: EcsStyle = "paper"  # "paper": mean_{i!=j} -(cos-beta)^2; "reference": 1-(relu(cos)-beta)^2 over the matrix
    dar: bool = False  # domain adaptation by reverse back-propagation (needs batch labels)
    dar_weight: float = 1.0  # paper §4.8 (multi-omic): DAR weight 1.0
    dar_lambda: float = 1.0  # gradient-reversal scale (Ganin & Lempitsky); 1.0 as the reference
    cls: bool = False  # cell-type classification on the cell embedding (needs labels)
    cls_weight: float = 1.0
    zero_prob_weight: float = 1.0  # Bernoulli NLL of the explicit zero probability, when enabled
    depth_adv: bool = False  # not in the paper: a depth discriminator behind gradient reversal on the cell
    # embeddings (<cls> and the mean gene state) during pretraining; it predicts each cell's quartile of expressed
    # genes within the mini-batch, so the cell state is pushed to carry cell type rather than sequencing depth
    # (BENCHMARKS.md, issue 10). Use with ModelConfig.depth_input, so the decoders still know the depth.
    depth_adv_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The network. Defaults are the paper's / released whole-human model's (§4.8, SPEC §4)."""

    vocab_size: int  # genes + special tokens; the vocabulary decides it, never a default
    d_model: int = 512  # §4.8: embedding size 512
    n_layers: int = 12  # §4.8: 12 transformer blocks
    n_heads: int = 8  # §4.8: 8 heads (head dim 64)
    d_ffn: int = 512  # §4.8: FFN hidden size 512 ("d_hid" in the release)
    dropout: float = 0.2  # released args.json: 0.2, on input embeddings, residual branches and FFN (the
    # fused attention kernels take no dropout, so attention probabilities are not dropped as in the release)
    n_bins: int = DEFAULT_N_BINS  # §4.1: 51 bins, 0 = zero expression
    max_seq_len: int = 1200  # genes per cell (+1 for <cls>), released args.json
    pad_id: int = PAD_ID  # gene id of <pad> (schema: 0)
    pad_value: float = -2.0  # value fed at <pad> and <cls> positions, released args.json
    mask_value: float = -1.0  # value fed at masked positions in "mlm" fine-tuning, released args.json
    value_encoding: ValueEncoding = "continuous"  # reference default; "category" = embedding over bins
    value_max: float = 512.0  # continuous encoder clamps its input at 512 (as released)
    gene_norm: bool = True  # LayerNorm after the gene embedding (released GeneEncoder)
    norm_scheme: NormScheme = "post"  # released layers are post-norm
    activation: Activation = "relu"  # released FFN activation
    layer_norm_eps: float = 1e-5  # torch default, as released
    reference_unknown_skip_out_proj: bool = False  # released generative layers skip out_proj for unknown
    # tokens (a reference quirk); the official import sets it when the checkpoint was trained generatively
    attention_backend: AttentionBackend = "auto"  # auto: flash when installed and on CUDA, else sdpa
    n_conditions: int = 0  # per-gene condition tokens (perturbation flags); 0 = no condition embedding
    n_batches: int = 0  # batch labels known to the model (DAR, DSBN, batch embedding)
    use_batch_labels: bool = False  # concat batch embedding to the heads' input (§4.2.3 eqs. 8-9)
    n_modalities: int = 0  # modality tokens (gene/peak/protein) concatenated before the heads (eq. 8)
    n_cell_types: int = 0  # CLS head size; 0 = no classifier
    cell_emb_style: CellEmbStyle = "cls"  # the cell embedding: the final <cls> state (released args.json), or
    # "avg-pool": the mean final state of the cell's gene tokens (the reference's other style)
    n_cls_layers: int = 3  # classifier / discriminator depth, released "n_layers_cls"
    depth_input: bool = False  # not in the paper: the cell's log expressed-gene count is fed to the GEP and GEPC
    # decoders (scVI-style library-size conditioning), so predicting bins does not need it in the cell state
    dsbn: bool = False  # domain-specific batch norm on the input embeddings (needs batch labels)
    dsbn_affine: bool = False  # reference uses affine only with "do_affine"
    explicit_zero_prob: bool = False  # extra Bernoulli head for zero expression
    embedding_init_range: float = 0.1  # gene embedding ~ U(-0.1, 0.1), as the reference init
    init_std: float | None = None  # None: torch's default Linear init, as the reference; a number: N(0, std), zero biases
    objectives: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def __post_init__(self) -> None:
        if self.vocab_size <= 3:
            raise ValueError(f"vocab_size must exceed the 3 special tokens, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if problem := n_bins_problem(self.n_bins):  # the range ingest and binning use
            raise ValueError(f"n_bins {problem}")
        if (self.dsbn or self.objectives.dar or self.use_batch_labels) and self.n_batches < 1:
            raise ValueError("dsbn, DAR and use_batch_labels need n_batches >= 1; set n_batches "
                             "to the number of batch labels in the data")
        if self.objectives.cls and self.n_cell_types < 2:
            raise ValueError("the CLS objective needs n_cell_types >= 2; set n_cell_types")
        for name, allowed in (("value_encoding", ValueEncoding), ("norm_scheme", NormScheme),
                              ("activation", Activation), ("attention_backend", AttentionBackend),
                              ("cell_emb_style", CellEmbStyle)):
            if getattr(self, name) not in allowed.__args__:
                raise ValueError(f"{name} must be one of {allowed.__args__}, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def head_input_dim(self) -> int:
        """Width of the token/cell state fed to the heads: doubled when batch/modality are concatenated."""
        return 2 * self.d_model if (self.use_batch_labels or self.n_modalities > 0) else self.d_model

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; ``objectives`` may be a dict of changes."""
        obj = changes.pop("objectives", None)
        if isinstance(obj, dict):
            obj = dataclasses.replace(self.objectives, **obj)
        if obj is not None:
            changes["objectives"] = obj
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["objectives"] = self.objectives.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        obj = d.pop("objectives", None) or {}
        if isinstance(obj, dict):
            okeys = {f.name for f in fields(ObjectiveConfig)}
            bad = sorted(set(obj) - okeys)
            if bad:
                raise ValueError(f"unknown objective keys {bad}; valid keys: {sorted(okeys)}")
            obj = ObjectiveConfig(**obj)
        return cls(**d, objectives=obj)
