"""Contrastive losses over a batch of embeddings.

Every loss is a small ``nn.Module`` returning a dict of named tensors with the total under ``"loss"``. A
cross-modal loss's ``forward(image_features, text_features)`` takes (B, D) L2-normalised embeddings, row i of each
being a positive pair and every other row a negative; pick one by name with :func:`make_loss` (names in
:data:`LOSSES`). :class:`SupervisedContrastiveLoss` works within one modality: ``forward(features, labels)``, rows
sharing a label being positives.

Equation numbers refer to timofeev2022 (Timofeev et al., *Multi-modal retrieval with smooth weighting of
negatives*, EE-608 report) unless another paper is named. It numbers four equations: the sum triplet loss
(Sec. III-A, unnumbered), the max triplet loss (Eq. 1), SimCLR (Eq. 2), Barlow Twins (Eq. 3) and its symmetrised
SimCLR for two modalities (Eq. 4). A misprinted formula is available behind a named flag (``printed_sign``,
``exclude_positive_from_denominator``; shi2024's ``printed_formula``) and the faithful reading is the default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def check_feature_pairs(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise ``ValueError`` unless both are non-empty (B, D) tensors of one shape (paired features)."""
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"expected two (B, D) tensors of the same shape, got {tuple(image_features.shape)} and "
            f"{tuple(text_features.shape)}"
        )
    if len(image_features) == 0:
        raise ValueError("expected a non-empty batch, got B = 0")


def _off_diagonal_mask(size: int, device: torch.device) -> torch.Tensor:
    return ~torch.eye(size, dtype=torch.bool, device=device)  # (size, size), False on the diagonal


class TripletLoss(nn.Module):
    """Hinge triplet loss in both directions: summed over negatives (VSE0, timofeev2022 Sec. III-A) or the
    hardest negative only (VSE++ "max violation", timofeev2022 Eq. 1; Faghri et al. 2018).

    With ``S = image_features @ text_features.T`` (positives on the diagonal) and margin ``alpha``:
    ``cost_i2t[i, j] = [alpha - S_ii + S_ij]_+`` (image anchor i, caption negative j) and
    ``cost_t2i[j, i] = [alpha - S_jj + S_ij]_+`` (caption anchor j, image negative i), for j != i.
    ``max_violation=False`` sums each anchor's costs over its negatives, ``True`` keeps their maximum.

    ``reduction="sum"`` sums the per-anchor costs over the batch, as the VSE++ reference does
    (``ContrastiveLoss`` in fartashf/vsepp returns ``cost_s.sum() + cost_im.sum()``); ``"mean"`` divides each
    direction by B, so the loss scale (and with SGD the effective learning rate) does not grow with the batch.
    A batch of one has no negatives: the loss is 0.

    ``printed_sign=True`` is the report's literal formula, ``[alpha - s(i, c') + s(i, c)]_+`` with (i, c) the
    positive: positive and negative similarities swapped, which rewards pushing positives apart. It is kept only
    to show that it fails.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = False, reduction: str = "sum",
                 printed_sign: bool = False):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.margin, self.max_violation, self.reduction = margin, max_violation, reduction
        self.printed_sign = printed_sign

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        check_feature_pairs(image_features, text_features)
        sims = image_features @ text_features.T  # (B, B): sims[i, j] = s(image i, caption j)
        if self.printed_sign:
            sims = -sims  # alpha - S_ii + S_ij becomes alpha + S_ii - S_ij, as printed
        positives = sims.diagonal()  # (B,)
        is_negative = _off_diagonal_mask(len(sims), sims.device)  # (B, B)
        # Row a of each cost matrix is anchor a; the diagonal (the positive itself) is masked to 0.
        cost_i2t = (self.margin - positives[:, None] + sims).clamp(min=0) * is_negative  # (B, B) images x captions
        cost_t2i = (self.margin - positives[:, None] + sims.T).clamp(min=0) * is_negative  # (B, B) captions x images
        if self.max_violation:  # costs are >= 0, so the masked 0 on the diagonal never wins over a real violation
            per_anchor_i2t, per_anchor_t2i = cost_i2t.max(dim=1).values, cost_t2i.max(dim=1).values  # (B,)
        else:
            per_anchor_i2t, per_anchor_t2i = cost_i2t.sum(dim=1), cost_t2i.sum(dim=1)  # (B,)
        reduce = torch.sum if self.reduction == "sum" else torch.mean
        loss_i2t, loss_t2i = reduce(per_anchor_i2t), reduce(per_anchor_t2i)
        return {"loss": loss_i2t + loss_t2i, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE over the batch: the "smooth weighting of all negatives" (timofeev2022 Eq. 4; SimCLR,
    Chen et al. 2020; CLIP, Radford et al. 2021).

    ``logits = S / temperature`` with ``S = image_features @ text_features.T`` and
    ``loss = (CE(logits, diag) + CE(logits.T, diag)) / 2``: each direction is the mean over anchors of
    ``-log(exp(S_ii / tau) / sum_j exp(S_ij / tau))``, the positive kept in the denominator as in SimCLR's and
    CLIP's code (open_clip ``ClipLoss``). Eq. (4) adds the two directions instead of averaging them; averaging
    only halves the scale (CLIP's convention; Adam is invariant to it).

    ``exclude_positive_from_denominator=True`` is the report's literal Eq. (4), whose denominators run over
    negatives only (``1[c' != c]``): SimCLR's mask of the anchor's self-similarity copied onto the positive. It
    goes negative, unlike the standard form; with unit embeddings it is bounded below by ``log(B - 1) - 2 / tau``
    (positives at 1, every negative at -1), a bound that falls without limit as ``tau`` shrinks. It needs B >= 2
    and is kept only as a flagged variant (see METHOD_NOTES).

    ``learn_temperature=True`` learns ``logit_scale = log(1 / temperature)`` (an ``nn.Parameter`` initialised
    from ``temperature``), clamped in forward to at most log(100), i.e. a temperature of at least 0.01, as in
    CLIP. Past the cap the parameter gets no gradient. ``temperature`` (a property) is the temperature in use.
    """

    MAX_LOGIT_SCALE = math.log(100.0)

    def __init__(self, temperature: float = 0.07, learn_temperature: bool = False,
                 exclude_positive_from_denominator: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if learn_temperature and math.log(1.0 / temperature) > self.MAX_LOGIT_SCALE:
            raise ValueError(f"a learned temperature starts clamped (no gradient) below 0.01, got {temperature}")
        self.learn_temperature = learn_temperature
        self.exclude_positive_from_denominator = exclude_positive_from_denominator
        self._fixed_temperature = float(temperature)
        if learn_temperature:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        else:
            self.register_parameter("logit_scale", None)  # a fixed temperature divides exactly, in any dtype

    @property
    def temperature(self) -> float:
        if self.logit_scale is None:
            return self._fixed_temperature
        return math.exp(-min(float(self.logit_scale.detach()), self.MAX_LOGIT_SCALE))

    def _direction(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over the rows (anchors) of -log softmax at the positive (the diagonal)."""
        if not self.exclude_positive_from_denominator:
            return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
        positives = logits.diagonal()  # (B,)
        negatives_only = logits.masked_fill(~_off_diagonal_mask(len(logits), logits.device), -torch.inf)  # (B, B)
        return (torch.logsumexp(negatives_only, dim=1) - positives).mean()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        check_feature_pairs(image_features, text_features)
        if self.exclude_positive_from_denominator and len(image_features) < 2:
            raise ValueError("the literal Eq. (4) needs at least one negative: batch size must be at least 2")
        sims = image_features @ text_features.T  # (B, B)
        if self.logit_scale is None:
            logits = sims / self._fixed_temperature  # (B, B)
        else:
            logits = self.logit_scale.clamp(max=self.MAX_LOGIT_SCALE).exp() * sims  # (B, B)
        loss_i2t, loss_t2i = self._direction(logits), self._direction(logits.T)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins between image and text embeddings (timofeev2022 Eq. 3 and Sec. IV-A; Zbontar et al. 2021).

    Each side is standardised over the batch without affine parameters (zero mean, biased variance, ``eps``
    added to the variance: ``nn.BatchNorm1d(D, affine=False)`` in training mode), then
    ``C = z_image.T @ z_text / B`` (D, D) and
    ``loss = on_diagonal + lambd * off_diagonal`` with ``on_diagonal = sum_i (1 - C_ii)^2`` and
    ``off_diagonal = sum_{i != j} C_ij^2`` (returned unscaled by ``lambd``). The report gives no lambda: 0.0051
    is the Barlow Twins default. Batch statistics need B >= 2.
    """

    def __init__(self, lambd: float = 0.0051, eps: float = 1e-5):
        super().__init__()
        if lambd < 0 or eps < 0:
            raise ValueError(f"lambd and eps must be non-negative, got lambd={lambd}, eps={eps}")
        self.lambd, self.eps = lambd, eps

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        mean = features.mean(dim=0, keepdim=True)  # (1, D)
        variance = features.var(dim=0, unbiased=False, keepdim=True)  # (1, D)
        return (features - mean) / torch.sqrt(variance + self.eps)  # (B, D)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        check_feature_pairs(image_features, text_features)
        batch = len(image_features)
        if batch < 2:
            raise ValueError("Barlow Twins normalises over the batch: batch size must be at least 2")
        correlation = self._standardise(image_features).T @ self._standardise(text_features) / batch  # (D, D)
        on_diagonal = (1 - correlation.diagonal()).pow(2).sum()
        off_diagonal = (correlation.pow(2) * _off_diagonal_mask(len(correlation), correlation.device)).sum()
        return {"loss": on_diagonal + self.lambd * off_diagonal, "on_diagonal": on_diagonal,
                "off_diagonal": off_diagonal}


def printed_term_of_cosine(cosine: torch.Tensor) -> torch.Tensor:
    """One term of shi2024 Eq. (2)/(4) for two unit vectors at cosine ``c``: ``|sqrt(2 - 2c) + c|`` (for plots)."""
    return ((2 - 2 * cosine).clamp(min=0).sqrt() + cosine).abs()


class SupervisedContrastiveLoss(nn.Module):
    """Supervised contrastive loss within one modality (SupCon "L_out", Khosla et al. 2020; the faithful reading
    of shi2024 Eqs. 2/4) over (N, D) L2-normalised features with set labels (N,).

    With ``s_ij = f_i . f_j / temperature``, ``P(i)`` the other items with ``i``'s label and ``A(i)`` all items but
    ``i``: ``loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )``, averaged over the
    anchors that have a positive (0 when none has). shi2024 gives no temperature: 0.1 (SupCon's best).

    ``printed_formula=True``: shi2024 Eq. (2)/(4) as printed, ``sum_i | ||F_i - F_{i+1}|| + F_i . F_{i+1} |`` over
    rows ``i, i+1`` that share a label (consecutive members of a positive set; all consecutive rows when ``labels``
    is None). Each term is :func:`printed_term_of_cosine`: 1 at cosine 1 and -1 alike, so the printed loss has no
    negatives and is minimised by a collapse of every feature onto one point; it is kept only to show that.
    """

    def __init__(self, temperature: float = 0.1, printed_formula: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature, self.printed_formula = float(temperature), printed_formula

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if features.dim() != 2 or len(features) == 0:
            raise ValueError(f"expected a non-empty (N, D) tensor, got {tuple(features.shape)}")
        if labels is not None and labels.shape != features.shape[:1]:
            raise ValueError(f"labels must have shape ({len(features)},), got {tuple(labels.shape)}")
        if self.printed_formula:
            return {"loss": self._printed(features, labels)}
        if labels is None:
            raise ValueError("supervised contrastive learning needs labels (the positive sets)")
        return {"loss": self._supervised_contrastive(features, labels)}

    @staticmethod
    def _printed(features: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        first, second = features[:-1], features[1:]  # (N-1, D): rows i and i+1
        terms = (torch.linalg.vector_norm(first - second, dim=1) + (first * second).sum(dim=1)).abs()  # (N-1,)
        if labels is not None:
            terms = terms * (labels[:-1] == labels[1:])  # only pairs inside one positive set
        return terms.sum()

    def _supervised_contrastive(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        count = len(features)
        is_self = torch.eye(count, dtype=torch.bool, device=features.device)  # (N, N)
        is_positive = (labels[:, None] == labels[None, :]) & ~is_self  # (N, N)
        positives_per_anchor = is_positive.sum(dim=1)  # (N,)
        has_positive = positives_per_anchor > 0
        if not bool(has_positive.any()):
            return features.sum() * 0.0  # no positive pair in the batch: nothing to pull together
        logits = (features @ features.T / self.temperature).masked_fill(is_self, -torch.inf)  # (N, N)
        log_probability = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # (N, N), -inf on the diagonal
        positive_sum = log_probability.masked_fill(~is_positive, 0.0).sum(dim=1)  # (N,)
        per_anchor = -positive_sum[has_positive] / positives_per_anchor[has_positive]  # (N_with_positives,)
        return per_anchor.mean()


def _triplet(max_violation: bool, options: dict) -> TripletLoss:
    if "max_violation" in options:
        raise ValueError("the loss name sets max_violation: use 'sum_triplet' or 'max_triplet' instead")
    return TripletLoss(max_violation=max_violation, **options)


def sum_triplet_loss(**options) -> TripletLoss:
    """:class:`TripletLoss` summed over negatives (VSE0); ``options`` go to its constructor."""
    return _triplet(False, options)


def max_triplet_loss(**options) -> TripletLoss:
    """:class:`TripletLoss` with the hardest negative (VSE++); ``options`` go to its constructor."""
    return _triplet(True, options)


#: The losses by the names the notebooks' parameters use (``make_loss(name, **options)``).
LOSSES = {
    "sum_triplet": sum_triplet_loss,
    "max_triplet": max_triplet_loss,
    "infonce": InfoNCELoss,
    "barlow_twins": BarlowTwinsLoss,
}


def make_loss(name: str, **kwargs) -> nn.Module:
    """The loss called ``name`` in :data:`LOSSES` (the names notebooks' parameters use), built with ``kwargs``."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
