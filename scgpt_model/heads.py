"""Output heads (§4.4): expression (GEP), GEPC, cell-type classifier, batch discriminator."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scgpt_model.layers import grad_reverse


def _mlp3(d_in: int, d_model: int, d_out: int) -> nn.Sequential:
    """Linear-LeakyReLU-Linear-LeakyReLU-Linear (the released expression decoder's shape)."""
    return nn.Sequential(nn.Linear(d_in, d_model), nn.LeakyReLU(), nn.Linear(d_model, d_model), nn.LeakyReLU(),
                         nn.Linear(d_model, d_out))


class ExpressionHead(nn.Module):
    """GEP head on each token's state: one value (MSE) or ``n_bins`` logits (CE, eq. 10)."""

    def __init__(self, d_in: int, d_model: int, n_out: int, explicit_zero_prob: bool) -> None:
        super().__init__()
        self.fc = _mlp3(d_in, d_model, n_out)
        self.zero_logit = _mlp3(d_in, d_model, 1) if explicit_zero_prob else None

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """h (N, d_in) -> (N,) values or (N, n_bins) logits; zero probability (N,) or None."""
        out = self.fc(h)
        out = out.squeeze(-1) if out.shape[-1] == 1 else out
        zp = torch.sigmoid(self.zero_logit(h).squeeze(-1)) if self.zero_logit is not None else None
        return out, zp


class GepcHead(nn.Module):
    """GEPC (eq. 11): x_j = sigmoid(MLP(emb_g(t_j))) . W h_c  -- a gene query against the cell."""

    def __init__(self, d_model: int, d_cell: int, explicit_zero_prob: bool) -> None:
        super().__init__()
        self.gene2query = nn.Linear(d_model, d_model)
        self.W = nn.Linear(d_model, d_cell, bias=False)
        self.W_zero_logit = nn.Linear(d_model, d_cell) if explicit_zero_prob else None

    def forward(self, gene_emb: Tensor, cell: Tensor) -> tuple[Tensor, Tensor | None]:
        """gene_emb (N, D) per token; cell (N, d_cell) = its cell's embedding -> (N,), (N,) | None."""
        q = torch.sigmoid(self.gene2query(gene_emb))
        pred = (self.W(q) * cell).sum(-1)
        zp = None
        if self.W_zero_logit is not None:
            zp = torch.sigmoid((self.W_zero_logit(q) * cell).sum(-1))
        return pred, zp


class MLPClassifier(nn.Module):
    """(n_layers - 1) x [Linear-act-LayerNorm] then Linear to classes; optional gradient reversal."""

    def __init__(self, d_model: int, n_classes: int, n_layers: int, act: type[nn.Module],
                 reverse_grad: bool = False, lambd: float = 1.0) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        for _ in range(n_layers - 1):
            mods += [nn.Linear(d_model, d_model), act(), nn.LayerNorm(d_model)]
        self.hidden = nn.Sequential(*mods)
        self.out = nn.Linear(d_model, n_classes)
        self.reverse_grad, self.lambd = reverse_grad, lambd

    def forward(self, x: Tensor) -> Tensor:  # (B, D) -> (B, n_classes)
        if self.reverse_grad:
            x = grad_reverse(x, self.lambd)
        return self.out(self.hidden(x))
