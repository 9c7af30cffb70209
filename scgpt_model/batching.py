"""Batching shared by the trainer and the evaluator: known/unknown split, sub-sampling, padding/packing.

Token order per cell is always ``[<cls>, known genes..., unknown genes...]``.

* ``sdpa`` layout (padded): tensors (B, L), each row ``[<cls>, known..., unknown..., <pad>...]``,
  L = the longest cell + 1 (no more padding than any padded batch). The keys are the first
  Lk = max(known + 1) columns (rounded up to 8) with a per-cell key mask that is True only on that
  cell's <cls> and known genes; a cell's unknown genes that sit inside those columns are masked
  out as keys, and every unknown token adds its own key through the self merge.
* ``flash`` layout (packed): tensors (T,) with the cells back to back, no padding;
  ``cu_q``/``cu_k``/``max_q``/``max_k``/``known_index`` are computed here, once per batch, on the
  host, so the model never syncs with the device to find them.

Cells longer than ``max_seq_len`` genes are sub-sampled with the seeded generator (never cut by
position). A cell with no known genes (or no genes at all) is valid: it keeps ``<cls>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from scgpt_model.attention import AttentionMeta, flash_available
from scgpt_model.schema import CLS_ID, PAD_ID

Backend = Literal["auto", "sdpa", "flash"]
KNOWN_BLOCK_MULTIPLE = 8  # known-block width rounded up: CUDA mem-efficient kernels want aligned biases


@dataclass
class ModelBatch:
    """One model input. Token tensors are (B, L) padded (``layout="padded"``) or (T,) packed."""

    layout: Literal["padded", "packed"]
    genes: Tensor  # long gene ids; <cls> first per cell, <pad> in padding
    values: Tensor  # float input values (bins) of known tokens; ignored at unknown/masked/pad
    targets: Tensor  # float true values (bins) of every real token (GEP target)
    token_mask: Tensor  # bool, real tokens incl. <cls>
    unknown: Tensor  # bool, tokens in the unknown block (gene + "unknown" flag, no value)
    masked: Tensor  # bool, known-block tokens whose value is replaced by mask_value ("mlm")
    loss_mask: Tensor  # bool, tokens the GEP/GEPC losses are computed on
    n_cells: int
    n_tokens: int  # real tokens (incl. <cls>), computed on the host
    unknown_count: int = 0  # real unknown tokens, computed on the host
    n_known: int = 0  # padded: number Lk of leading columns that hold keys
    known_valid: Tensor | None = None  # padded: (B, Lk) bool, the real known keys (<cls> + known genes)
    known_index: Tensor | None = None  # packed: (Tk,) rows that are keys
    cu_q: Tensor | None = None  # packed: (B+1,) int32 offsets of all tokens
    cu_k: Tensor | None = None  # packed: (B+1,) int32 offsets of the key rows
    max_q: int = 0
    max_k: int = 0
    condition: Tensor | None = None  # long per token (perturbation flags), like genes
    modality: Tensor | None = None  # long per token (gene / peak / protein), like genes
    batch_labels: Tensor | None = None  # (B,) long
    celltype_labels: Tensor | None = None  # (B,) long
    n_expressed: Tensor | None = None  # (B,) float: each cell's expressed genes before sub-sampling (depth)

    # ------------------------------------------------------------------------------------------
    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.n_tokens / float(self.genes.numel()) if self.genes.numel() else 0.0

    @property
    def any_unknown(self) -> bool:
        return bool(self.unknown_count > 0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ModelBatch:
        changes = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                   for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), Tensor)}
        return dataclasses.replace(self, **changes)

    def cls_index(self) -> Tensor:
        """Flat index of each cell's <cls> token in the flattened token tensors, (B,)."""
        if self.layout == "packed":
            return self.cu_q[:-1].long()
        return torch.arange(self.n_cells, device=self.genes.device) * self.genes.shape[1]

    def token_cell(self) -> Tensor:
        """Cell index of every flattened token, (N,)."""
        if self.layout == "packed":
            lengths = (self.cu_q[1:] - self.cu_q[:-1]).long()
            return torch.repeat_interleave(torch.arange(self.n_cells, device=self.genes.device), lengths,
                                           output_size=self.genes.shape[0])
        return torch.arange(self.n_cells, device=self.genes.device).repeat_interleave(self.genes.shape[1])

    def attention_meta(self) -> AttentionMeta:
        if self.layout == "packed":
            return AttentionMeta(backend="flash", self_mask=self.unknown, known_index=self.known_index,
                                 cu_q=self.cu_q, cu_k=self.cu_k, max_q=self.max_q, max_k=self.max_k,
                                 any_unknown=self.any_unknown)
        bias = torch.zeros(self.known_valid.shape, dtype=torch.float32, device=self.genes.device)
        bias = bias.masked_fill(~self.known_valid, float("-inf"))[:, None, None, :]  # (B, 1, 1, Lk)
        return AttentionMeta(backend="sdpa", self_mask=self.unknown[:, None, :], n_known=self.n_known,
                             key_bias=bias, any_unknown=self.any_unknown)

    def as_fully_known(self) -> ModelBatch:
        """Same cells, every real token known with its true value (for embeddings)."""
        hidden = self.unknown | self.masked
        values = torch.where(hidden, self.targets, self.values)
        none = torch.zeros_like(self.unknown)
        common = dict(values=values, unknown=none, masked=none, loss_mask=none, unknown_count=0)
        if self.layout == "packed":
            idx = torch.arange(self.genes.shape[0], device=self.genes.device)
            return dataclasses.replace(self, known_index=idx, cu_k=self.cu_q, max_k=self.max_q, **common)
        return dataclasses.replace(self, n_known=self.genes.shape[1], known_valid=self.token_mask, **common)


# ----------------------------------------------------------------------------------------------
@dataclass
class CellTokens:
    """One cell's genes in model order (known first, then unknown), before <cls> and padding."""

    genes: np.ndarray  # (n,) int
    values: np.ndarray  # (n,) float, input values (ignored where unknown/masked)
    targets: np.ndarray  # (n,) float, true values
    unknown: np.ndarray  # (n,) bool; all True entries come after all False entries
    masked: np.ndarray  # (n,) bool
    loss: np.ndarray  # (n,) bool
    condition: np.ndarray | None = None  # (n,) int
    modality: np.ndarray | None = None  # (n,) int
    n_expressed: int | None = None  # expressed genes of the whole cell before sub-sampling; None: its known ones


def resolve_backend(backend: Backend) -> Literal["sdpa", "flash"]:
    if backend == "auto":
        return "flash" if flash_available() else "sdpa"
    if backend not in ("sdpa", "flash"):
        raise ValueError(f"attention backend must be 'auto', 'sdpa' or 'flash', got {backend!r}")
    return backend  # "flash" packs on any host (collation runs on CPU); the model checks the device


def as_generator(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def subsample(n: int, max_len: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of the genes a cell keeps: all, or a seeded random subset of ``max_len`` (sorted)."""
    if max_len is None or n <= max_len:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_len, replace=False))


def _n_known_expressed(c: CellTokens) -> int:
    """A cell's expressed genes among its known, unmasked tokens: the depth a model may see (never a target)."""
    return int(((~c.unknown) & (~c.masked) & (np.asarray(c.values) > 0)).sum())


def _labels(x: Sequence[int] | np.ndarray | Tensor | None, n: int, name: str) -> Tensor | None:
    if x is None:
        return None
    t = torch.as_tensor(np.asarray(x), dtype=torch.long)
    if t.shape != (n,):
        raise ValueError(f"{name} must have one label per cell ({n}), got shape {tuple(t.shape)}")
    return t


def assemble(cells: Sequence[CellTokens], *, backend: Backend = "sdpa", batch_labels=None,
             celltype_labels=None) -> ModelBatch:
    """Prepend <cls> to each cell and pad (sdpa) or pack (flash) into a ModelBatch."""
    packed = resolve_backend(backend) == "flash"
    b = len(cells)
    if b == 0:
        raise ValueError("cannot collate an empty list of cells")
    has_cond = any(c.condition is not None for c in cells)
    has_mod = any(c.modality is not None for c in cells)
    n_unk = np.array([int(c.unknown.sum()) for c in cells])
    n_kn = np.array([len(c.genes) for c in cells]) - n_unk + 1  # + <cls>
    n_tokens = int((n_kn + n_unk).sum())
    n_expr = torch.tensor([c.n_expressed if c.n_expressed is not None else _n_known_expressed(c) for c in cells],
                          dtype=torch.float32)
    fields = ("genes", "values", "targets", "unknown", "masked", "loss", "condition", "modality")
    dtypes = dict(genes=np.int64, values=np.float32, targets=np.float32, unknown=bool, masked=bool,
                  loss=bool, condition=np.int64, modality=np.int64)

    def cls_row(c: CellTokens, f: str):  # value of field f at the <cls> position
        return {"genes": CLS_ID, "values": 0.0, "targets": 0.0, "unknown": False, "masked": False,
                "loss": False, "condition": 0, "modality": 0}[f]

    def field_of(c: CellTokens, f: str) -> np.ndarray:
        v = getattr(c, f)
        if v is None:
            v = np.zeros(len(c.genes), dtype=dtypes[f])
        return np.concatenate([[cls_row(c, f)], np.asarray(v)]).astype(dtypes[f])

    if packed:
        cat = {f: np.concatenate([field_of(c, f) for c in cells]) for f in fields}
        lens = n_kn + n_unk
        cu_q = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(n_kn)]).astype(np.int32)
        known_index = np.concatenate([np.arange(s, s + k) for s, k in zip(cu_q[:-1], n_kn)])
        t = {f: torch.from_numpy(cat[f]) for f in fields}
        return ModelBatch(
            layout="packed", genes=t["genes"], values=t["values"], targets=t["targets"],
            token_mask=torch.ones(n_tokens, dtype=torch.bool), unknown=t["unknown"], masked=t["masked"],
            loss_mask=t["loss"], n_cells=b, n_tokens=n_tokens, known_index=torch.from_numpy(known_index).long(),
            cu_q=torch.from_numpy(cu_q), cu_k=torch.from_numpy(cu_k), max_q=int(lens.max()), max_k=int(n_kn.max()),
            condition=t["condition"] if has_cond else None, modality=t["modality"] if has_mod else None,
            batch_labels=_labels(batch_labels, b, "batch_labels"),
            celltype_labels=_labels(celltype_labels, b, "celltype_labels"), unknown_count=int(n_unk.sum()),
            n_expressed=n_expr)

    lk = int(-(-n_kn.max() // KNOWN_BLOCK_MULTIPLE) * KNOWN_BLOCK_MULTIPLE)
    width = max(int((n_kn + n_unk).max()), lk)
    arr = {f: np.zeros((b, width), dtype=dtypes[f]) for f in fields}
    arr["genes"][:] = PAD_ID
    token_mask = np.zeros((b, width), dtype=bool)
    known_valid = np.zeros((b, lk), dtype=bool)
    for i, c in enumerate(cells):
        n = n_kn[i] + n_unk[i]
        for f in fields:
            arr[f][i, :n] = field_of(c, f)
        token_mask[i, :n] = True
        known_valid[i, : n_kn[i]] = True
    t = {f: torch.from_numpy(arr[f]) for f in fields}
    tm = torch.from_numpy(token_mask)
    return ModelBatch(
        layout="padded", genes=t["genes"], values=t["values"], targets=t["targets"], token_mask=tm,
        unknown=t["unknown"], masked=t["masked"], loss_mask=t["loss"], n_cells=b, n_tokens=n_tokens,
        n_known=lk, known_valid=torch.from_numpy(known_valid), condition=t["condition"] if has_cond else None,
        modality=t["modality"] if has_mod else None, batch_labels=_labels(batch_labels, b, "batch_labels"),
        celltype_labels=_labels(celltype_labels, b, "celltype_labels"), unknown_count=int(n_unk.sum()),
        n_expressed=n_expr)


# ----------------------------------------------------------------------------------------------
def _check_values(v: np.ndarray) -> None:
    if v.size and not (np.isfinite(v).all() and v.min() >= 0):
        raise ValueError("cell values must be finite, non-negative bins (0 .. n_bins-1); bin the data first "
                         "(scgpt_model.binning.bin_csr)")


def split_cell(genes: np.ndarray, values: np.ndarray, n_unknown: int, rng: np.random.Generator,
               condition: np.ndarray | None = None, modality: np.ndarray | None = None) -> CellTokens:
    """Choose ``n_unknown`` random genes as unknown; known first, unknown after."""
    n = len(genes)
    perm = rng.permutation(n)
    unk, kn = np.sort(perm[:n_unknown]), np.sort(perm[n_unknown:])
    order = np.concatenate([kn, unk])
    flags = np.zeros(n, dtype=bool)
    flags[len(kn):] = True
    return CellTokens(genes=genes[order], values=values[order], targets=values[order], unknown=flags,
                      masked=np.zeros(n, dtype=bool), loss=flags.copy(),
                      condition=None if condition is None else condition[order],
                      modality=None if modality is None else modality[order])


def collate_generative(genes: Sequence[np.ndarray], values: Sequence[np.ndarray], *, max_seq_len: int,
                       seed: int | np.random.Generator, unknown_ratios: Sequence[float] = (0.25, 0.5, 0.75),
                       backend: Backend = "sdpa", batch_labels=None, celltype_labels=None) -> ModelBatch:
    """Generative pretraining batch (§4.3.2) from each cell's nonzero genes and their bins.

    Per cell (seeded): sub-sample to ``max_seq_len`` genes if longer, draw a ratio from
    ``unknown_ratios``, make round(ratio * n) random genes unknown (GEP/GEPC targets).
    """
    if len(genes) != len(values):
        raise ValueError(f"genes and values must list the same cells ({len(genes)} vs {len(values)})")
    if not unknown_ratios or any(not 0.0 <= r <= 1.0 for r in unknown_ratios):
        raise ValueError(f"unknown_ratios must be fractions in [0, 1], got {unknown_ratios}")
    rng = as_generator(seed)
    cells = []
    for g, v in zip(genes, values):
        g, v = np.asarray(g), np.asarray(v, dtype=np.float32)
        if g.shape != v.shape:
            raise ValueError(f"a cell's genes and values differ in length ({g.shape} vs {v.shape})")
        _check_values(v)
        n_expr = int((v > 0).sum())
        keep = subsample(len(g), max_seq_len, rng)
        g, v = g[keep], v[keep]
        ratio = float(rng.choice(np.asarray(unknown_ratios, dtype=float)))
        cells.append(dataclasses.replace(split_cell(g, v, int(round(ratio * len(g))), rng), n_expressed=n_expr))
    return assemble(cells, backend=backend, batch_labels=batch_labels, celltype_labels=celltype_labels)


def collate_all_genes(genes: np.ndarray | Sequence[np.ndarray], values: np.ndarray | Sequence[np.ndarray], *,
                      seed: int | np.random.Generator, mask_ratio: float = 0.4,
                      mode: Literal["mlm", "generative"] = "mlm",
                      max_seq_len: int | None = None, backend: Backend = "sdpa", batch_labels=None,
                      celltype_labels=None, modality: np.ndarray | None = None) -> ModelBatch:
    """Fine-tuning batch on a fixed gene set INCLUDING zeros (e.g. HVGs), paper §4.5.

    ``genes``: (G,) ids shared by all cells, or one array per cell; ``values``: (B, G) bins (0 for
    zero expression) or one array per cell. ``mask_ratio`` (paper §4.8: 0.4) of each cell's genes
    become GEP targets: in ``mode="mlm"`` (as the reference fine-tuning) their value is replaced
    by the mask value and every token sees every other; in ``mode="generative"`` they go to the
    unknown block. ``mask_ratio=0`` gives an unmasked batch (CLS fine-tuning, embeddings).
    ``modality``: (G,) per-gene modality ids for a shared gene set, or one array per cell when
    ``genes`` is per cell (mosaic multi-omic data: each cell lists only the features it measured).
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if mode not in ("mlm", "generative"):
        raise ValueError(f"mode must be 'mlm' or 'generative', got {mode!r}")
    rng = as_generator(seed)
    n_cells = len(values)
    shared = isinstance(genes, np.ndarray) and genes.ndim == 1 and np.issubdtype(genes.dtype, np.integer)
    if modality is not None and not shared and len(modality) != n_cells:
        raise ValueError("modality ids: one (G,) array for a shared gene set, or one array per cell when genes "
                         f"are per cell (got {len(modality)} for {n_cells} cells)")
    cells = []
    for i in range(n_cells):
        g = np.asarray(genes if shared else genes[i])
        v = np.asarray(values[i], dtype=np.float32)
        if g.shape != v.shape:
            raise ValueError(f"cell {i}: {len(v)} values for {len(g)} genes")
        _check_values(v)
        m = None if modality is None else np.asarray(modality if shared else modality[i])
        if m is not None and m.shape != g.shape:
            raise ValueError(f"cell {i}: {len(m)} modality ids for {len(g)} genes")
        n_expr = int((v > 0).sum())
        keep = subsample(len(g), max_seq_len, rng)
        g, v = g[keep], v[keep]
        m = None if m is None else m[keep]
        n_mask = int(round(mask_ratio * len(g)))
        if mode == "generative":
            cells.append(dataclasses.replace(split_cell(g, v, n_mask, rng, modality=m), n_expressed=n_expr))
            continue
        masked = np.zeros(len(g), dtype=bool)
        masked[rng.choice(len(g), size=n_mask, replace=False)] = True
        cells.append(CellTokens(genes=g, values=v, targets=v, unknown=np.zeros(len(g), dtype=bool), masked=masked,
                                loss=masked.copy(), modality=m, n_expressed=n_expr))
    return assemble(cells, backend=backend, batch_labels=batch_labels, celltype_labels=celltype_labels)


def collate_perturbation(genes: np.ndarray | Sequence[np.ndarray], control_values, target_values, perturbed, *,
                         measured=None, backend: Backend = "sdpa", max_seq_len: int | None = None,
                         seed: int | np.random.Generator = 0) -> ModelBatch:
    """Perturb-GEP batch (§4.4, §4.5): a control cell in, its paired perturbed cell as target.

    ``genes``: (G,) ids shared by all cells, or one array per cell (a cell may carry extra tokens,
    e.g. a perturbed gene the assay did not measure); ``control_values`` / ``target_values``: the
    input and target values, (B, G) or one array per cell; ``perturbed``: condition tokens, same
    shape (1 = this gene is perturbed in this cell, 0 = not). Every gene is known (input = the
    control value) and carries loss (target = the perturbed value), except where ``measured`` (same
    shape, bool; None = everything measured) is False: such a token has no observed value, so its
    input value is the mask value and it is left out of the loss (and of any score).

    Cells longer than ``max_seq_len`` are sub-sampled (seeded) among their unperturbed genes only:
    every perturbed gene keeps its token and flag, since the flag is the condition (official scGPT
    #298 dropped them), and the cell still has at most ``max_seq_len`` genes.
    """
    shared = isinstance(genes, np.ndarray) and genes.ndim == 1 and np.issubdtype(genes.dtype, np.integer)
    n_cells = len(control_values)
    if (len(target_values) != n_cells or len(perturbed) != n_cells
            or (measured is not None and len(measured) != n_cells)):
        raise ValueError("control_values, target_values, perturbed (and measured) must list the same cells")
    if not shared and len(genes) != n_cells:
        raise ValueError(f"genes: one (G,) array for all cells or one array per cell ({n_cells}), got {len(genes)}")
    rng = as_generator(seed)
    cells = []
    for i in range(n_cells):
        g = np.asarray(genes if shared else genes[i])
        x, y, f = (np.asarray(a[i]) for a in (control_values, target_values, perturbed))
        m = np.ones(len(g), dtype=bool) if measured is None else np.asarray(measured[i], dtype=bool)
        if not (x.shape == y.shape == f.shape == m.shape == g.shape):
            raise ValueError(f"cell {i}: control, target, perturbed and measured must each have one entry per gene "
                             f"({len(g)} genes; got {x.shape}, {y.shape}, {f.shape}, {m.shape})")
        flagged = np.flatnonzero(f)
        keep = np.arange(len(g))
        if max_seq_len is not None and len(g) > max_seq_len:
            rest = np.setdiff1d(keep, flagged)  # perturbed genes are always kept: they are the condition
            room = max(max_seq_len - flagged.size, 0)
            keep = np.union1d(flagged, rest[subsample(rest.size, room, rng)])
        m = m[keep]
        cells.append(CellTokens(genes=g[keep], values=np.where(m, x[keep], 0).astype(np.float32),
                                targets=np.where(m, y[keep], 0).astype(np.float32),
                                unknown=np.zeros(keep.size, dtype=bool), masked=~m, loss=m.copy(),
                                condition=f[keep].astype(np.int64)))
    return assemble(cells, backend=backend)
