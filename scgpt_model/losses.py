"""Loss terms (§4.4) and the one typed, self-checking record the trainer logs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LossOutput:
    """``total`` (scalar, differentiable) = sum of weight * term; ``terms`` detached, for logging.

    A new objective only adds a term here; the trainer logs whatever ``terms`` holds.
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.total, Tensor) or self.total.dim() != 0:
            raise ValueError("LossOutput.total must be a scalar tensor, "
                             f"got {getattr(self.total, 'shape', self.total)}")
        for k, v in self.terms.items():
            if not isinstance(v, Tensor) or v.dim() != 0:
                raise ValueError(f"loss term {k!r} must be a scalar tensor")
            if v.requires_grad:
                raise ValueError(f"loss term {k!r} must be detached (terms are for logging)")
        missing = set(self.weights) - set(self.terms)
        if missing:
            raise ValueError(f"weights given for absent terms {sorted(missing)}")

    @classmethod
    def from_terms(cls, raw: dict[str, Tensor], weights: dict[str, float]) -> LossOutput:
        if not raw:
            raise ValueError("no loss term was computed; enable an objective the batch has targets for")
        total = sum(weights[k] * v for k, v in raw.items())
        return cls(total=total, terms={k: v.detach() for k, v in raw.items()}, weights=dict(weights))

    def to_floats(self) -> dict[str, float]:
        """Terms plus ``total`` as python floats (one host sync)."""
        vals = torch.stack([self.total.detach(), *self.terms.values()]).float().cpu().tolist()
        return dict(zip(["total", *self.terms], vals))


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over ``mask`` (0 when the mask is empty; no host sync), in float32
    (a bf16 sum over ~10^5 tokens would lose precision)."""
    m = mask.float()
    return ((pred.float() - target.float()) ** 2 * m).sum() / m.sum().clamp_min(1.0)


def masked_ce(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Cross entropy over bins (eq. 10) on the masked tokens. logits (N, n_bins), target (N,) bins."""
    n_bins = logits.shape[-1]
    t = target.round().long().clamp(0, n_bins - 1)
    ce = F.cross_entropy(logits.float(), t, reduction="none")
    m = mask.to(ce.dtype)
    return (ce * m).sum() / m.sum().clamp_min(1.0)


def masked_bernoulli_nll(zero_prob: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """NLL of "value is zero" under the explicit zero probability, over the masked tokens."""
    p = zero_prob.float().clamp(1e-6, 1 - 1e-6)
    is_zero = (target == 0).float()
    nll = -(is_zero * torch.log(p) + (1 - is_zero) * torch.log1p(-p))
    m = mask.float()
    return (nll * m).sum() / m.sum().clamp_min(1.0)


def ecs_loss(cell_emb: Tensor, beta: float, style: str = "paper") -> Tensor:
    """Elastic cell similarity (eq. 12) over the pairs of cells in the mini-batch.

    paper:     mean over ordered pairs i != j of -(cos(h_i, h_j) - beta)^2
    reference: mean over the full B x B matrix (diagonal set to 0) of 1 - (relu(cos) - beta)^2
    """
    z = F.normalize(cell_emb.float(), p=2, dim=1)
    cos = z @ z.t()  # (B, B)
    b = cos.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=cos.device)
    if style == "reference":
        cos = F.relu(cos.masked_fill(eye, 0.0))
        return torch.mean(1 - (cos - beta) ** 2)
    if b < 2:
        return cos.sum() * 0.0
    return -((cos - beta) ** 2).masked_select(~eye).mean()
