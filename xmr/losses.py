"""Contrastive losses over a batch of paired embeddings.

Every loss is a small ``nn.Module`` whose ``forward(image_features, text_features)`` takes (B, D) L2-normalised
embeddings, row i of each being a positive pair and every other row a negative, and returns a dict of named
tensors with the total under ``"loss"``. Equation numbers refer to timofeev2022 (Timofeev et al.,
*Multi-modal retrieval with smooth weighting of negatives*).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"expected two (B, D) tensors of the same shape, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )


class TripletLoss(nn.Module):
    """Hinge triplet loss in both directions: sum over negatives (VSE0, Eq. 1) or the hardest one (VSE++, Eq. 2).

    For the similarity matrix S = image_features @ text_features.T (positives on the diagonal),
    ``cost_i2t[i, j] = [margin - S_ii + S_ij]_+`` and ``cost_t2i[i, j] = [margin - S_ii + S_ji]_+`` for j != i;
    ``max_violation=False`` sums them over j, ``True`` keeps the maximum (Faghri et al. 2018).
    ``reduction="sum"`` sums over the batch as the VSE++ reference does; ``"mean"`` divides by B, which makes the
    loss scale independent of the batch size (the learning rate then means the same thing across batch sizes).

    ``printed_sign=True`` is the report's literal equations, ``[alpha - s(i, c') + s(i, c)]_+``: the positive and
    negative similarities swapped, which rewards pushing positives apart. Kept only to show that it fails.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = False, reduction: str = "sum",
                 printed_sign: bool = False):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margin, self.max_violation, self.reduction = margin, max_violation, reduction
        self.printed_sign = printed_sign

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_pairs(image_features, text_features)
        sims = image_features @ text_features.T  # (B, B)
        if self.printed_sign:
            sims = -sims  # margin - S_ii + S_ij becomes margin + S_ii - S_ij, as printed
        positives = sims.diagonal().unsqueeze(1)  # (B, 1)
        negatives = ~torch.eye(len(sims), dtype=torch.bool, device=sims.device)
        cost_i2t = (self.margin - positives + sims).clamp(min=0) * negatives  # image anchors, caption negatives
        cost_t2i = (self.margin - positives + sims.T).clamp(min=0) * negatives  # caption anchors, image negatives
        if self.max_violation:
            per_anchor_i2t, per_anchor_t2i = cost_i2t.max(dim=1).values, cost_t2i.max(dim=1).values  # (B,)
        else:
            per_anchor_i2t, per_anchor_t2i = cost_i2t.sum(dim=1), cost_t2i.sum(dim=1)
        reduce = torch.sum if self.reduction == "sum" else torch.mean
        loss_i2t, loss_t2i = reduce(per_anchor_i2t), reduce(per_anchor_t2i)
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (SimCLR/CLIP) over the batch: the smooth weighting of all negatives (Eq. 4).

    ``loss = (CE(S / tau, diag) + CE(S.T / tau, diag)) / 2``, the positive kept in the denominator as in SimCLR's
    and CLIP's code. ``exclude_positive_from_denominator=True`` is the report's literal Eq. (4), whose
    denominator runs over negatives only (a copy of SimCLR's self-mask onto the positive; kept as a flagged
    variant, see METHOD_NOTES). ``learn_temperature=True`` learns ``logit_scale = log(1 / tau)``, clamped to at
    most log(100) as in CLIP (Radford et al. 2021).
    """

    MAX_LOGIT_SCALE = math.log(100.0)

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = False,
                 exclude_positive_from_denominator: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        # float64, so float64 inputs keep full precision (a 0-d tensor does not up-cast float32 inputs).
        logit_scale = torch.tensor(math.log(1.0 / temperature), dtype=torch.float64)
        if learn_temperature:
            self.logit_scale = nn.Parameter(logit_scale)
        else:
            self.register_buffer("logit_scale", logit_scale)
        self.exclude_positive_from_denominator = exclude_positive_from_denominator

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=self.MAX_LOGIT_SCALE).exp())

    def _direction(self, logits: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(len(logits), device=logits.device)
        if not self.exclude_positive_from_denominator:
            return F.cross_entropy(logits, labels)
        positives = logits.diagonal()  # (B,)
        negatives = logits.masked_fill(torch.eye(len(logits), dtype=torch.bool, device=logits.device), -torch.inf)
        return (torch.logsumexp(negatives, dim=1) - positives).mean()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_pairs(image_features, text_features)
        if self.exclude_positive_from_denominator and len(image_features) < 2:
            raise ValueError("the literal Eq. (4) needs at least one negative: batch size >= 2")
        logits = self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE).exp() * image_features @ text_features.T  # (B, B)
        loss_i2t, loss_t2i = self._direction(logits), self._direction(logits.T)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins between image and text embeddings (Eq. 3; Zbontar et al. 2021).

    Each side is batch-normalised without affine parameters (biased variance, eps 1e-5, as
    ``BatchNorm1d(affine=False)`` in training mode); ``C = z_img.T @ z_txt / B`` and
    ``loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2``. ``lambd`` is not given in the report: 0.0051
    is the Barlow Twins default.
    """

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5):
        super().__init__()
        self.lambd, self.eps = lambd, eps

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        mean = features.mean(dim=0, keepdim=True)
        variance = features.var(dim=0, unbiased=False, keepdim=True)
        return (features - mean) / torch.sqrt(variance + self.eps)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_pairs(image_features, text_features)
        if len(image_features) < 2:
            raise ValueError("Barlow Twins normalises over the batch: batch size must be at least 2")
        batch = len(image_features)
        correlation = self._standardise(image_features).T @ self._standardise(text_features) / batch  # (D, D)
        diagonal = correlation.diagonal()
        on_diagonal = (1 - diagonal).pow(2).sum()
        off_diagonal = correlation.pow(2).sum() - diagonal.pow(2).sum()
        return {"loss": on_diagonal + self.lambd * off_diagonal, "on_diagonal": on_diagonal,
                "off_diagonal": off_diagonal}


LOSSES = {
    "sum_triplet": lambda **options: TripletLoss(**{"max_violation": False, **options}),
    "max_triplet": lambda **options: TripletLoss(**{"max_violation": True, **options}),
    "infonce": InfoNCELoss,
    "barlow_twins": BarlowTwinsLoss,
}


def make_loss(name: str, **options) -> nn.Module:
    """A loss by its name in :data:`LOSSES` (the names the notebooks' parameters use)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name](**options)
