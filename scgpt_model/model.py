"""The scGPT network (§4.1-§4.4): embeddings, generative-attention transformer, heads, losses."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scgpt_model import attention
from scgpt_model.batching import ModelBatch, resolve_backend
from scgpt_model.config import CellEmbStyle, ModelConfig
from scgpt_model.heads import ExpressionHead, GepcHead, MLPClassifier
from scgpt_model.layers import (CategoryValueEncoder, ContinuousValueEncoder, DomainSpecificBatchNorm, GeneEncoder,
                                LabelEncoder, TransformerLayer)
from scgpt_model.losses import LossOutput, ecs_loss, masked_bernoulli_nll, masked_ce, masked_mse
from scgpt_model.schema import CLS_ID

logger = logging.getLogger(__name__)

DEPTH_CLASSES = 4  # the depth discriminator's target: each cell's quartile of expressed genes in its mini-batch
DEPTH_CENTRE = 6.0  # log1p(expressed genes) is fed to the decoders minus this (e^6 ~ 400 genes), about unit scale


@dataclass
class ModelOutput:
    """Everything one forward produces. Token tensors are flat (N,) over ``batch.genes`` flattened."""

    cell_emb: Tensor  # (B, D) final state of <cls> (or the mean gene state: cell_emb_style "avg-pool")
    hidden: Tensor  # (N, D) final token states
    expr_pred: Tensor  # (N,) predicted value (MSE head) or argmax bin (CE head)
    expr_logits: Tensor | None = None  # (N, n_bins), CE head only
    zero_prob: Tensor | None = None  # (N,) explicit zero probability
    gepc_pred: Tensor | None = None  # (N,) GEPC prediction
    cls_logits: Tensor | None = None  # (B, n_cell_types)
    dar_logits: Tensor | None = None  # (B, n_batches)
    depth_logits: Tensor | None = None  # (2B, DEPTH_CLASSES): the depth discriminator on <cls>, then on the
    # mean gene state
    loss: LossOutput | None = None


class ScGPT(nn.Module):
    """scGPT: gene + value (+ condition) embeddings -> transformer -> heads.

    Call ``model(batch)`` with a :class:`ModelBatch` from :mod:`scgpt_model.batching`.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.gene_encoder = GeneEncoder(cfg.vocab_size, d, cfg.pad_id, cfg.gene_norm)
        if cfg.value_encoding == "continuous":
            self.value_encoder: nn.Module = ContinuousValueEncoder(d, cfg.value_max)
        else:
            self.value_encoder = CategoryValueEncoder(d, cfg.n_bins, cfg.mask_value)
        self.flag_encoder = nn.Embedding(2, d)  # row 1: the "unknown" flag of §4.3.2 (row 0 unused, as released)
        self.condition_encoder = nn.Embedding(cfg.n_conditions, d) if cfg.n_conditions > 0 else None
        self.batch_encoder = LabelEncoder(cfg.n_batches, d) if cfg.use_batch_labels else None
        self.modality_encoder = LabelEncoder(cfg.n_modalities, d) if cfg.n_modalities > 0 else None
        self.dsbn = DomainSpecificBatchNorm(d, cfg.n_batches, cfg.dsbn_affine) if cfg.dsbn else None
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(d, cfg.n_heads, cfg.d_ffn, cfg.dropout, cfg.norm_scheme, cfg.activation,
                             cfg.layer_norm_eps, cfg.reference_unknown_skip_out_proj) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.norm_scheme == "pre" else None
        obj = cfg.objectives
        d_head = cfg.head_input_dim
        n_out = cfg.n_bins if obj.gep_loss == "ce" else 1
        self.expr_head = ExpressionHead(d_head, d, n_out, cfg.explicit_zero_prob)
        d_cell = 2 * d if cfg.use_batch_labels else d
        self.gepc_head = GepcHead(d, d_cell, cfg.explicit_zero_prob) if obj.gepc else None
        self.cls_head = (MLPClassifier(d, cfg.n_cell_types, cfg.n_cls_layers, nn.ReLU)
                         if cfg.n_cell_types > 1 else None)
        self.dar_head = (MLPClassifier(d, cfg.n_batches, cfg.n_cls_layers, nn.LeakyReLU, reverse_grad=True,
                                       lambd=obj.dar_lambda) if obj.dar else None)
        # depth conditioning of the decoders, and the depth discriminator (ModelConfig.depth_input,
        # ObjectiveConfig.depth_adv)
        self.depth_gep = nn.Linear(1, d_head) if cfg.depth_input else None
        self.depth_gepc = nn.Linear(1, d_cell) if cfg.depth_input and obj.gepc else None
        self.depth_head = (MLPClassifier(d, DEPTH_CLASSES, cfg.n_cls_layers, nn.LeakyReLU, reverse_grad=True)
                           if obj.depth_adv else None)
        self.init_weights()

    # ------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Explicit init. Linear layers: torch's default (kaiming-uniform weights, bound 1/sqrt(fan_in),
        uniform biases), as the reference, which never re-initialises them; ``init_std`` set to a
        number gives GPT-2 style N(0, init_std) weights with zero biases instead. Gene embedding
        ~ U(+-range) with a zero <pad> row (reference); other embeddings ~ N(0, 0.02); norms 1 / 0.

        Why not N(0, 0.02) everywhere: on a narrow model it silences the network at init. At width
        32 the attention and FFN branches then add ~1e-4 of the residual, so every cell's <cls>
        state is the same vector to 3e-5 (measured: per-dim std across cells 1.6e-4 vs norm 5.7) and
        the gradient reaching the trunk is ~1e-4: fine-tuning from random init sat at the class
        prior. And with zero biases the value encoder relu(w1 x) -> LayerNorm maps every expressed
        bin (1 and 50 alike) to one vector. BENCHMARKS.md, "Why fine-tuning learned nothing"."""
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if cfg.init_std is None:
                    m.reset_parameters()
                else:
                    nn.init.normal_(m.weight, std=cfg.init_std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=cfg.init_std or 0.02)
            elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        if isinstance(self.value_encoder, ContinuousValueEncoder):
            # always torch's default: with zero biases relu(w1 * x) is proportional to x for x > 0 and
            # the LayerNorm after it is scale-invariant, so expression magnitude would be invisible
            self.value_encoder.linear1.reset_parameters()
            self.value_encoder.linear2.reset_parameters()
        last = self.expr_head.fc[-1]
        if last.out_features == 1:
            # the MSE head starts at the middle expressed bin instead of 0: targets are bins 1 ..
            # n_bins-1 (mean ~n_bins/2), and Adam moves a bias by ~lr per step, so from 0 a 1e-3 lr
            # spends its first ~1,000 steps only reaching the mean (measured: GEP loss flat at ~800)
            with torch.no_grad():
                last.bias.fill_(cfg.n_bins / 2)
        emb = self.gene_encoder.embedding
        nn.init.uniform_(emb.weight, -cfg.embedding_init_range, cfg.embedding_init_range)
        with torch.no_grad():
            emb.weight[cfg.pad_id].zero_()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.gene_encoder.embedding.weight.numel()
        return n

    def collate_backend(self) -> str:
        """The batch layout this model's config asks for ("sdpa" or "flash")."""
        return resolve_backend(self.cfg.attention_backend)

    # ------------------------------------------------------------------------------------------
    def gene_embeddings(self, ids: Tensor | None = None) -> Tensor:
        """Gene token embeddings as the model uses them (after the gene LayerNorm), (n, D).

        ``ids=None`` returns every vocabulary id (specials included, row = id)."""
        dev = self.gene_encoder.embedding.weight.device
        if ids is None:
            ids = torch.arange(self.cfg.vocab_size, device=dev)
        with torch.no_grad():
            return self.gene_encoder(torch.as_tensor(ids, device=dev).long()).detach()

    def _embed(self, batch: ModelBatch, cell_prompt: Tensor | None) -> tuple[Tensor, Tensor]:
        """Input embeddings (eq. 5), flat (N, D); also the gene embeddings (N, D) for GEPC."""
        cfg = self.cfg
        genes = batch.genes.reshape(-1)
        tm = batch.token_mask.reshape(-1)
        unk = batch.unknown.reshape(-1)
        vals = batch.values.reshape(-1).float()
        vals = torch.where(batch.masked.reshape(-1), torch.full_like(vals, cfg.mask_value), vals)
        vals = torch.where((genes == CLS_ID) | ~tm, torch.full_like(vals, cfg.pad_value), vals)
        g = self.gene_encoder(genes)  # (N, D)
        v = self.value_encoder(vals)  # (N, D)
        # call the module (not .weight[1]) so sharded wrappers (ZeRO-3) gather its weight
        flag = self.flag_encoder(torch.ones((), dtype=torch.long, device=v.device)).to(v.dtype)  # (D,)
        x = g + torch.where(unk.unsqueeze(-1), flag.expand_as(v), v)
        if self.condition_encoder is not None:
            if batch.condition is None:
                raise ValueError("this model has a condition embedding (n_conditions > 0); the batch must carry "
                                 "condition tokens (use collate_perturbation)")
            x = x + self.condition_encoder(batch.condition.reshape(-1))
        if self.dsbn is not None:
            x = self.dsbn(x, self._require_batch_labels(batch)[batch.token_cell()], tm)
        if cell_prompt is not None:
            x = x.index_copy(0, batch.cls_index(), cell_prompt.to(x.dtype))
        return self.input_dropout(x), g

    def _require_batch_labels(self, batch: ModelBatch) -> Tensor:
        if batch.batch_labels is None:
            raise ValueError("this model uses batch labels (DSBN / DAR / batch embedding); pass batch_labels "
                             "to the collate function")
        return batch.batch_labels

    def encode(self, batch: ModelBatch, cell_prompt: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Transformer states: (hidden (N, D), cell_emb (B, D), gene embeddings (N, D))."""
        if batch.layout == "packed" and not attention.packed_supported(batch.genes.device):
            raise ValueError("a packed (flash) batch needs flash-attn and the model on CUDA; collate with "
                             "backend='sdpa' (or 'auto') on CPU, or install flash-attn (scgpt-census[gpu])")
        x, g = self._embed(batch, cell_prompt)
        if batch.layout == "padded":
            x = x.view(*batch.genes.shape, -1)  # (B, L, D)
        meta = batch.attention_meta()
        for layer in self.layers:
            x = layer(x, meta)
        if self.final_norm is not None:
            x = self.final_norm(x)
        h = x.reshape(-1, x.shape[-1])
        if self.cfg.cell_emb_style == "avg-pool":
            return h, _mean_gene_state(h, batch), g
        return h, h.index_select(0, batch.cls_index()), g

    # ------------------------------------------------------------------------------------------
    def forward(self, batch: ModelBatch, *, cell_prompt: Tensor | None = None,
                compute_loss: bool = True, cls_class_weight: Tensor | None = None) -> ModelOutput:
        """``cls_class_weight``: (n_cell_types,) weights of the CLS cross-entropy (None: unweighted)."""
        cfg = self.cfg
        h, cell_emb, g = self.encode(batch, cell_prompt)
        need_cell = None
        head_in = h
        if cfg.use_batch_labels or self.modality_encoder is not None:
            extra = torch.zeros_like(h)
            if cfg.use_batch_labels:
                batch_emb = self.batch_encoder(self._require_batch_labels(batch))  # (B, D)
                need_cell = batch.token_cell()
                extra = extra + batch_emb.index_select(0, need_cell)
            if self.modality_encoder is not None:
                if batch.modality is None:
                    raise ValueError("this model has modality tokens (n_modalities > 0); pass modality to the collate")
                extra = extra + self.modality_encoder(batch.modality.reshape(-1))
            head_in = torch.cat([h, extra], dim=-1)  # eq. 8
        depth = _log_depth(batch, h) if self.depth_gep is not None else None  # (B, 1)
        if depth is not None:
            need_cell = need_cell if need_cell is not None else batch.token_cell()
            head_in = head_in + self.depth_gep(depth.to(h.dtype)).index_select(0, need_cell)
        expr, zero_prob = self.expr_head(head_in)
        out = ModelOutput(cell_emb=cell_emb, hidden=h, expr_pred=expr, zero_prob=zero_prob)
        if expr.dim() == 2:
            out.expr_logits, out.expr_pred = expr, expr.argmax(-1).to(h.dtype)
        gepc_zero = None
        if self.gepc_head is not None:
            cell_in = cell_emb
            if cfg.use_batch_labels:
                cell_in = torch.cat([cell_emb, batch_emb], dim=-1)  # eq. 9
            if self.depth_gepc is not None:
                cell_in = cell_in + self.depth_gepc(depth.to(cell_in.dtype))
            tc = need_cell if need_cell is not None else batch.token_cell()
            out.gepc_pred, gepc_zero = self.gepc_head(g, cell_in.index_select(0, tc))
        if self.cls_head is not None:
            out.cls_logits = self.cls_head(cell_emb)
        if self.dar_head is not None:
            out.dar_logits = self.dar_head(cell_emb)
        if self.depth_head is not None:
            pooled = cell_emb if cfg.cell_emb_style == "avg-pool" else _mean_gene_state(h, batch)
            states = torch.cat([h.index_select(0, batch.cls_index()), pooled])
            out.depth_logits = self.depth_head(states)
        if compute_loss:
            out.loss = self._losses(batch, out, gepc_zero, cls_class_weight)
        return out

    def _losses(self, batch: ModelBatch, out: ModelOutput, gepc_zero: Tensor | None,
                cls_class_weight: Tensor | None = None) -> LossOutput:
        obj = self.cfg.objectives
        tgt = batch.targets.reshape(-1)
        mask = batch.loss_mask.reshape(-1)
        raw: dict[str, Tensor] = {}
        w: dict[str, float] = {}
        if obj.gep:
            if out.expr_logits is not None:
                raw["gep"] = masked_ce(out.expr_logits, tgt, mask)
            else:
                raw["gep"] = masked_mse(out.expr_pred, tgt, mask)
            w["gep"] = obj.gep_weight
            if out.zero_prob is not None:
                raw["gep_zero"], w["gep_zero"] = masked_bernoulli_nll(out.zero_prob, tgt, mask), obj.zero_prob_weight
        if out.gepc_pred is not None:
            raw["gepc"], w["gepc"] = masked_mse(out.gepc_pred, tgt, mask), obj.gepc_weight
            if gepc_zero is not None:
                raw["gepc_zero"], w["gepc_zero"] = masked_bernoulli_nll(gepc_zero, tgt, mask), obj.zero_prob_weight
        if obj.ecs:
            raw["ecs"], w["ecs"] = ecs_loss(out.cell_emb, obj.ecs_beta, obj.ecs_style), obj.ecs_weight
        if out.dar_logits is not None:
            labels = self._require_batch_labels(batch)
            raw["dar"] = nn.functional.cross_entropy(out.dar_logits.float(), labels)
            w["dar"] = obj.dar_weight
        if out.depth_logits is not None:
            labels = _depth_quartile(_n_expressed(batch, out.hidden)).to(out.depth_logits.device)
            raw["depth_adv"] = nn.functional.cross_entropy(out.depth_logits.float(), labels.repeat(2))
            w["depth_adv"] = obj.depth_adv_weight
        if obj.cls and out.cls_logits is not None:
            if batch.celltype_labels is None:
                raise ValueError("the CLS objective is on; pass celltype_labels to the collate function")
            raw["cls"] = nn.functional.cross_entropy(out.cls_logits.float(), batch.celltype_labels,
                                                     weight=cls_class_weight)
            w["cls"] = obj.cls_weight
        return LossOutput.from_terms(raw, w)

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed_cells(self, batch: ModelBatch, style: CellEmbStyle | None = None) -> Tensor:
        """Cell embeddings (B, D): eval mode, no grad, every real gene known with its value.
        ``style`` ("cls" / "avg-pool") overrides the model's ``cell_emb_style``."""
        was_training = self.training
        self.eval()
        known = batch.as_fully_known()
        try:
            h, cell_emb, _ = self.encode(known)
        finally:
            self.train(was_training)
        if style is None or style == self.cfg.cell_emb_style:
            return cell_emb
        return _mean_gene_state(h, known) if style == "avg-pool" else h.index_select(0, known.cls_index())


def _mean_gene_state(h: Tensor, batch: ModelBatch) -> Tensor:
    """(B, D) mean final state over each cell's real gene tokens (<cls> and <pad> left out)."""
    keep = batch.token_mask.reshape(-1).clone()
    keep[batch.cls_index()] = False
    w = keep.to(h.dtype)
    cell = batch.token_cell()
    total = torch.zeros(batch.n_cells, h.shape[-1], dtype=h.dtype, device=h.device).index_add_(0, cell, h * w[:, None])
    count = torch.zeros(batch.n_cells, dtype=h.dtype, device=h.device).index_add_(0, cell, w)
    return total / count.clamp_min(1.0)[:, None]


def _n_expressed(batch: ModelBatch, h: Tensor) -> Tensor:
    """(B,) expressed genes per cell, as ``batching.assemble`` counted them (never from a target)."""
    if batch.n_expressed is None:
        raise ValueError("a depth-aware model (depth_input / depth_adv) needs each cell's expressed-gene count; "
                         "build the batch with scgpt_model.batching's collate functions")
    return batch.n_expressed.to(h.device, torch.float32)


def _log_depth(batch: ModelBatch, h: Tensor) -> Tensor:
    """(B, 1) the decoders' depth input: log1p(expressed genes) - DEPTH_CENTRE."""
    return (torch.log1p(_n_expressed(batch, h)) - DEPTH_CENTRE).unsqueeze(-1)


def _depth_quartile(n: Tensor) -> Tensor:
    """(B,) long: each cell's rank of expressed genes in the batch, in DEPTH_CLASSES equal groups (ties by order)."""
    rank = torch.argsort(torch.argsort(n, stable=True), stable=True)
    return (rank * DEPTH_CLASSES // max(n.numel(), 1)).long()
