"""DRCL: selective prior learning (SPL) and reversible semantic consistency (RSC) for category-based retrieval.

R. Pu, Y. Qin, D. Peng, X. Song and H. Zheng, "Deep Reversible Consistency Learning for Cross-modal Retrieval",
IEEE Transactions on Multimedia (arXiv:2501.05686). The paper's equations were lost in its text extraction;
``../shared/papers/METHOD_NOTES.md`` rebuilds them from the authors' code (the paper's link is
github.com/perquisite/DRCL; the copy inspected here is its mirror github.com/QinYang79/DRCL), which this module
follows. Equation numbers are the paper's.

Every modality ``k`` has its own encoder ``f_k`` (:class:`ModalityEncoder`) and is trained alone, so any number of
modalities, with any number of (unpaired) samples each, can be used. Two stages:

1. **SPL** (:class:`SPLModel`, :func:`learn_prior`, :func:`select_prior`). On every modality, an encoder and a
   matrix ``W_k`` (d x C, initialised as the first C columns of a random orthogonal d x d matrix, the same for
   every modality) are trained with the generalised cross-entropy (Eq. 1, :func:`generalized_cross_entropy`)
   ``mean_i [1 - softmax(z_i W_k)_{y_i} ** q] / q`` under the hardness schedule ``q_t = min(1, 0.01 t)``
   (:func:`hardness_q`, ``t`` = epoch from 1). The quality score (Eq. 2, :func:`quality_score`) is the mean
   true-class probability on the training set; each modality keeps the ``W_k`` of its best-scoring epoch, and the
   prior ``W*`` is the ``W_k`` with the highest score.
2. **RSC** (:class:`RSCModel`, :class:`ReversibleConsistencyLoss`, :func:`train_modality`). With ``W*`` frozen,
   every modality trains a fresh encoder: feature mixup in the common space (FA, Eq. 3, :func:`feature_mixup`,
   ``lambda = 0.9``), class anchors recast through the pseudo-inverse (MRR, Eq. 4, :func:`recast_anchors`,
   ``r_i = y'_i W*^+``), and ``J = J_L + alpha J_D + beta J_MSE`` (Eqs. 5-8, alpha = beta = 0.1). The epoch with
   the lowest validation loss is kept.

Each stage trains one modality with :func:`xmr.train.fit` (:func:`training_config`: Adam with the authors'
betas, float32, no gradient clipping): the epoch's ``q`` is set by the model's ``on_epoch_start``, a
:class:`~xmr.category_retrieval.Modality` hands the loader whole batches, and a stage stops once its selection
score has not improved for ``patience`` epochs, or after ``max_epochs`` (SPL: ``DRCLSettings.spl_patience``,
``spl_min_delta`` and ``spl_max_epochs``). A modality with few training items gets a smaller batch
(:func:`modality_batch_size`), so that every epoch has a few steps.

:func:`prior_geometry` describes a prior (column norms, correlations between columns, how far it moved from its
random initial matrix), and ``prior="random_rescaled"`` in :func:`run_drcl` is the control that separates SPL's
scale from its geometry: the random orthogonal initial matrix with its columns rescaled to the learned prior's
norms.

The baselines of the comparison are here too: :func:`train_sdml_modality` (SDML, Hu et al. SIGIR 2019: a fixed
random orthogonal prior, a label regression loss and an auto-encoder), and CCA in :mod:`xmr.methods.cca`.

Known bugs of the authors' code are kept only as flagged variants (:class:`DRCLSettings`):
``literal_q_at_epoch_zero`` (SPL's ``q = 0.01 * epoch`` with the epoch counted from 0: ``q = 0`` and a 0/0 = NaN
loss in the first epoch, whose gradient is zero, so that epoch changes nothing) and ``prior_from_last_epoch``
(the code keeps a live reference to ``W``, so the "best" prior is the last epoch's, not the best-scoring one's).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..category_retrieval import CrossModalData, Modality, map_evaluation, map_table, pr_curves
from ..results import staged_training, write_result
from ..train import TrainConfig, TrainResult, encode, fit

ADAM_BETAS = (0.5, 0.999)  # the authors' main.py (and SDML's code)

#: What the authors' own Wikipedia run printed (``logging/wiki.log`` of their repository, mirror
#: github.com/QinYang79/DRCL at commit 1c5f92c, run of 2024-11-01 with seed 1, 200 epochs, batch 1024,
#: lr [6e-6, 5e-3], lr_SPL 5e-4): MAP@all and MAP@50, image->text and text->image, and their means. Their
#: released test features (:func:`xmr.data.load_drcl_wikipedia_features`) are that run's.
AUTHORS_WIKIPEDIA_LOG = {
    "source": "logging/wiki.log, github.com/QinYang79/DRCL @ 1c5f92ca6e6b6d3f1596474ddc676ea4853f3afd",
    "map_all_image2text": 0.56190, "map_all_text2image": 0.53759, "map_all_avg": 0.54974,
    "map_50_image2text": 0.55988, "map_50_text2image": 0.68478, "map_50_avg": 0.62233,
}

# ---------------------------------------------------------------------------------------------------------------
# The model and the equations
# ---------------------------------------------------------------------------------------------------------------


class ModalityEncoder(nn.Module):
    """``f_k``: input -> H -> ReLU -> H -> ReLU -> d (no bias) -> L2 normalisation (Sec. IV-B; H = 4096,
    d = 2048 for Wikipedia, 512 for XMedia). The representation layer is initialised uniform in
    ``+-1/sqrt(input_dim)`` as in the authors' ``Data_Net``."""

    def __init__(self, input_dim: int, hidden_dim: int = 4096, embed_dim: int = 2048):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(),
                                    nn.Linear(hidden_dim, hidden_dim), nn.ReLU())
        self.representation = nn.Linear(hidden_dim, embed_dim, bias=False)
        bound = 1.0 / math.sqrt(input_dim)
        nn.init.uniform_(self.representation.weight, -bound, bound)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.representation(self.hidden(inputs)), dim=1)   # (B, d), unit rows


def random_orthogonal_prior(embed_dim: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    """The first C columns of a random orthogonal d x d matrix (d x C, orthonormal columns): DRCL's initial W and
    SDML's fixed prior. Computed as the QR factor of a d x C Gaussian with the sign fix of
    ``torch.nn.init.orthogonal_``, which has the same (Haar) distribution as slicing a full d x d one."""
    if num_classes > embed_dim:
        raise ValueError(f"{num_classes} orthonormal columns need embed_dim >= num_classes, got {embed_dim}")
    gaussian = torch.randn(embed_dim, num_classes, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()                          # (d, C)


def match_column_norms(prior: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``prior`` (d x C) with each column rescaled to the norm of the same column of ``reference``: same directions
    (an orthonormal ``prior`` stays orthogonal), the reference's scale. With the random orthogonal initial matrix as
    ``prior`` and SPL's learned one as ``reference`` this is the control that has SPL's scale but not its geometry."""
    if prior.shape != reference.shape:
        raise ValueError(f"prior {tuple(prior.shape)} and reference {tuple(reference.shape)} differ in shape")
    return prior * (reference.norm(dim=0) / prior.norm(dim=0).clamp_min(1e-12))


@torch.no_grad()
def prior_geometry(prior: torch.Tensor, initial: torch.Tensor | None = None) -> dict[str, float]:
    """What a prior W (d x C) looks like: the mean, smallest and largest column norm,
    the mean and largest absolute cosine
    between two columns (0 for an orthogonal W), ``max |W^+ W - I|`` (the recast anchors map back to the labels) and,
    with the ``initial`` matrix it was trained from, the mean cosine of each column to its initial column."""
    prior = prior.double()
    norms = prior.norm(dim=0)                                                   # (C,)
    cosines = (prior.T @ prior) / torch.outer(norms, norms).clamp_min(1e-12)   # (C, C)
    off_diagonal = cosines[~torch.eye(len(norms), dtype=torch.bool)].abs()
    identity = torch.linalg.pinv(prior) @ prior - torch.eye(prior.shape[1], dtype=prior.dtype)
    geometry = {"column_norm_mean": float(norms.mean()), "column_norm_min": float(norms.min()),
                "column_norm_max": float(norms.max()),
                "column_abs_cos_mean": float(off_diagonal.mean()) if len(off_diagonal) else 0.0,
                "column_abs_cos_max": float(off_diagonal.max()) if len(off_diagonal) else 0.0,
                "pinv_identity_error": float(identity.abs().max())}
    if initial is not None:
        geometry["cos_to_initial_mean"] = float(F.cosine_similarity(prior, initial.double(), dim=0).mean())
    return geometry


def _log_true_class_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log sum_c y_ic softmax(logits_i)_c for class indices (N,) or soft labels (N, C); (N,)."""
    log_probs = F.log_softmax(logits, dim=1)                                    # (N, C)
    if targets.dim() == 1:
        return log_probs.gather(1, targets[:, None]).squeeze(1)
    return torch.logsumexp(log_probs + torch.log(targets.to(log_probs.dtype)), dim=1)


def generalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, q: float,
                              literal: bool = False) -> torch.Tensor:
    """Eq. (1) / (7): ``mean_i [1 - p_i ** q] / q`` with ``p_i = sum_c y_ic softmax(logits_i)_c``.

    ``targets`` are class indices (N,) or soft labels (N, C) (the mixup labels of FA). ``q -> 0`` is the
    cross-entropy ``-log p_i``, and ``q = 0`` returns exactly that; ``q = 1`` is the mean absolute error
    ``1 - p_i``. Computed as ``-expm1(q log p) / q``, exact for small ``q``. ``literal=True`` evaluates the
    printed ``(1 - p ** q) / q`` as the authors' code does, which is NaN at ``q = 0`` (their first epoch).
    """
    if q < 0:
        raise ValueError(f"q must be >= 0, got {q}")
    log_p = _log_true_class_probability(logits, targets)                       # (N,)
    if literal:                                  # q = 0 divides 0 by 0: NaN, as in the authors' first SPL epoch
        return ((1.0 - log_p.exp() ** q) / q).mean()
    if q == 0:
        return (-log_p).mean()
    return (-torch.expm1(q * log_p) / q).mean()


def hardness_q(epoch: int, ramp_epochs: float = 100.0, fixed: float | None = None,
               literal_epoch_zero: bool = False) -> float:
    """The hardness schedule ``q_t = min(1, t / ramp_epochs)`` (paper: ``min(1, 0.01 t)``, t = 1, 2, ...).

    ``fixed`` replaces it by a constant (Table V's variants #5-#8). ``literal_epoch_zero`` counts epochs from 0
    as the authors' SPL loop does (``q = 0`` in the first epoch).
    """
    if fixed is not None:
        return float(fixed)
    t = epoch - 1 if literal_epoch_zero else epoch
    return min(1.0, t / ramp_epochs)


@torch.no_grad()
def quality_score(embeddings: torch.Tensor, labels: torch.Tensor, prior: torch.Tensor) -> float:
    """Eq. (2): the mean true-class probability ``mean_i softmax(z_i W)_{y_i}`` (higher is better)."""
    return float(_log_true_class_probability(embeddings @ prior, labels).exp().mean())


def feature_mixup(features: torch.Tensor, targets: torch.Tensor, lam: float = 0.9,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA, Eq. (3): ``x' = lam x_i + (1 - lam) x_pi(i)`` and ``y'`` likewise, ``pi`` a random permutation of the
    batch (it may fix some ``i``). Not re-normalised. Returns ``(x', y', pi)``."""
    permutation = torch.randperm(len(features), generator=generator).to(features.device)
    mixed_features = lam * features + (1 - lam) * features[permutation]         # (B, D)
    mixed_targets = lam * targets + (1 - lam) * targets[permutation]           # (B, C)
    return mixed_features, mixed_targets, permutation


def recast_anchors(targets: torch.Tensor, prior_inverse: torch.Tensor) -> torch.Tensor:
    """MRR, Eq. (4): the modality-invariant anchors ``r_i = y'_i W*^+`` ((B, C) @ (C, d) -> (B, d))."""
    return targets @ prior_inverse


def scaled_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``C(a_i, b_j) = 2 cos(a_i, b_j)`` for all pairs, (A, B); norms clamped at 1e-6 as in the authors' code."""
    norms = a.norm(dim=1, keepdim=True) @ b.norm(dim=1, keepdim=True).T
    return 2.0 * (a @ b.T) / norms.clamp_min(1e-6)


class ReversibleConsistencyLoss(nn.Module):
    """RSC's objective, Eq. (8): ``J = eta J_L + alpha J_D + beta J_MSE`` with the prior ``W*`` frozen.

    - ``J_MSE`` (Eq. 5): element-mean of ``(r_i - z'_i)^2``;
    - ``J_D`` (Eq. 6): ``mean_ij [C(r_i, r_j) - C(z'_i, z'_j)]^2 + mean_ij [C(r_i, z'_j) - C(r_j, z'_i)]^2``;
    - ``J_L`` (Eq. 7): the GCE of Eq. (1) on ``softmax(z' W*)`` with the (soft) labels ``y'``;

    with anchors ``r = y' W*^+`` (Eq. 4). ``recast="transpose"`` uses ``W*^T`` instead of the pseudo-inverse
    (not a paper variant: it equals the pseudo-inverse only for orthonormal columns). Defaults: alpha = beta = 0.1,
    eta = 1 (Sec. IV-B and the authors' ``main.py``).
    """

    def __init__(self, prior: torch.Tensor, alpha: float = 0.1, beta: float = 0.1, eta: float = 1.0,
                 recast: str = "pinv", literal_gce: bool = False):
        super().__init__()
        if recast not in ("pinv", "transpose"):
            raise ValueError(f"recast must be 'pinv' or 'transpose', got {recast!r}")
        prior = prior.detach().float()
        inverse = torch.linalg.pinv(prior.double()).float() if recast == "pinv" else prior.T.clone()
        self.register_buffer("prior", prior)                                   # (d, C), frozen
        self.register_buffer("prior_inverse", inverse)                         # (C, d)
        self.alpha, self.beta, self.eta, self.literal_gce = alpha, beta, eta, literal_gce

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor, q: float) -> dict[str, torch.Tensor]:
        anchors = recast_anchors(targets, self.prior_inverse)                  # (B, d)
        mse = F.mse_loss(anchors, embeddings)
        c_rr, c_zz = scaled_cosine(anchors, anchors), scaled_cosine(embeddings, embeddings)   # (B, B)
        c_rz = scaled_cosine(anchors, embeddings)                              # (B, B): C(r_i, z'_j)
        discrimination = ((c_rr - c_zz) ** 2).mean() + ((c_rz - c_rz.T) ** 2).mean()
        label = generalized_cross_entropy(embeddings @ self.prior, targets, q, self.literal_gce)
        total = self.eta * label + self.alpha * discrimination + self.beta * mse
        return {"loss": total, "label": label, "discrimination": discrimination, "mse": mse}




# ---------------------------------------------------------------------------------------------------------------
# Training one modality (with xmr.train.fit)
# ---------------------------------------------------------------------------------------------------------------


def training_config(max_epochs: int = 200, patience: int | None = 10, batch_size: int = 100, lr: float = 5e-4,
                    seed: int = 0, device: str = "cpu", **changes) -> TrainConfig:
    """The :class:`xmr.train.TrainConfig` of an encoder-training stage (RSC, SDML), as the authors' loop runs
    it: float32 and no gradient clipping (Adam's betas come from the models: ``ADAM_BETAS``); no progress
    bars, since a run trains many short stages. Each stage sets its own ``select_by`` and ``select_mode``.

    ``max_epochs``: paper 200 (Wikipedia), 300 (XMedia), no early stop. ``batch_size``: paper 1024, which leaves no
    batch for modalities with fewer training samples. ``lr``: paper per modality (Wikipedia image 6e-6, text
    5e-3)."""
    return TrainConfig(max_epochs=max_epochs, patience=patience, batch_size=batch_size, lr=lr, seed=seed,
                       device=device, grad_clip_norm=None, mixed_precision=False, progress=False, **changes)


def modality_batch_size(num_train: int, batch_size: int, min_steps: int = 4) -> int:
    """The batch of a modality with ``num_train`` training items: ``batch_size``, but at most ``num_train //
    min_steps`` (and at least 2), so that a small modality still takes ``min_steps`` steps per epoch. The paper's
    batch of 1024 leaves no full batch at all for its smaller modalities (XMedia's 3D models); ours leaves
    Wikipedia and UCI unchanged."""
    return max(2, min(batch_size, num_train // min_steps))


def _modality_config(training: TrainConfig, train: Modality, **changes) -> TrainConfig:
    return dataclasses.replace(training, batch_size=modality_batch_size(len(train), training.batch_size), **changes)


def _encoder(input_dim: int, hidden_dim: int, embed_dim: int, seed: int) -> ModalityEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ModalityEncoder(input_dim, hidden_dim, embed_dim)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


def _adam_groups(module: nn.Module) -> list[dict]:
    return [{"params": [p for p in module.parameters() if p.requires_grad], "betas": ADAM_BETAS}]


@dataclass
class DRCLSettings:
    """The method's hyper-parameters and the ablation switches of Table V (defaults: the paper's method)."""

    hidden_dim: int = 4096                 # paper: 4096
    embed_dim: int = 2048                  # paper: 2048 (Wikipedia, NUS-WIDE), 512 (XMedia, XMediaNet, INRIA)
    alpha: float = 0.1                     # weight of J_D (paper: 0.1)
    beta: float = 0.1                      # weight of J_MSE (paper: 0.1)
    eta: float = 1.0                       # weight of J_L (paper: 1)
    mix_lambda: float = 0.9                # FA mixing factor (paper: 0.9)
    augmentation: str = "embedding"        # "embedding" (FA, Eq. 3) | "input" (#11) | "none" (#10)
    q_ramp_epochs: float = 100.0           # q_t = min(1, t / q_ramp_epochs); paper: 100 (q = 0.01 t)
    fixed_q: float | None = None           # a constant q in RSC's J_L (#5-#8)
    use_label_loss: bool = True            # J_L (#2-#4 remove one loss each)
    use_discrimination_loss: bool = True   # J_D
    use_mse_loss: bool = True              # J_MSE
    recast: str = "pinv"                   # "pinv" (Eq. 4) | "transpose" (not in the paper)
    spl_lr: float = 5e-4                   # paper: 5e-4 for every modality
    spl_max_epochs: int = 200              # SPL's epoch budget; paper: 200 (Wikipedia), 300 (XMedia)
    spl_patience: int | None = 10          # stop SPL after this many epochs without a better score; paper: never
    spl_min_delta: float = 0.002           # a better quality score must beat the best by this much (plateau rule)
    literal_q_at_epoch_zero: bool = False  # code bug: SPL's first epoch has q = 0 (NaN loss, no update)
    prior_from_last_epoch: bool = False    # code bug: the selected W is the last epoch's, not the best epoch's

    def __post_init__(self) -> None:
        if self.augmentation not in ("embedding", "input", "none"):
            raise ValueError(f"augmentation must be 'embedding', 'input' or 'none', got {self.augmentation!r}")

    def loss(self, prior: torch.Tensor) -> ReversibleConsistencyLoss:
        return ReversibleConsistencyLoss(prior, alpha=self.alpha if self.use_discrimination_loss else 0.0,
                                         beta=self.beta if self.use_mse_loss else 0.0,
                                         eta=self.eta if self.use_label_loss else 0.0, recast=self.recast)

    def q(self, epoch: int) -> float:
        return hardness_q(epoch, self.q_ramp_epochs, self.fixed_q)


#: Table V's variants (paper numbers in parentheses; #2-#4 remove the three RSC losses in an order lost in the
#: paper's extraction, and #9's two symbols were lost, so it cannot be reproduced). Each maps to the changes of
#: DRCLSettings, plus ``prior`` for run_drcl. Not paper variants: "transpose_recast", and "rescaled_random_prior",
#: the control for #1 (the random prior at the learned prior's column norms: SPL's scale without its geometry).
TABLE5_VARIANTS: dict[str, tuple[str, dict]] = {
    "no_spl": ("#1", {"prior": "random"}),
    "no_label_loss": ("#2-#4", {"use_label_loss": False}),
    "no_discrimination_loss": ("#2-#4", {"use_discrimination_loss": False}),
    "no_mse_loss": ("#2-#4", {"use_mse_loss": False}),
    "q_0.01": ("#5", {"fixed_q": 0.01}),
    "q_0.5": ("#6", {"fixed_q": 0.5}),
    "q_1": ("#7", {"fixed_q": 1.0}),
    "q_2": ("#8", {"fixed_q": 2.0}),
    "no_fa": ("#10", {"augmentation": "none"}),
    "input_fa": ("#11", {"augmentation": "input"}),
    "transpose_recast": ("not in the paper", {"recast": "transpose"}),
    "rescaled_random_prior": ("not in the paper", {"prior": "random_rescaled"}),
}


def ablation(settings: DRCLSettings, variant: str) -> tuple[DRCLSettings, str]:
    """The settings and the ``prior`` argument of :func:`run_drcl` for one of :data:`TABLE5_VARIANTS`."""
    changes = dict(TABLE5_VARIANTS[variant][1])
    prior = changes.pop("prior", "learned")
    return dataclasses.replace(settings, **changes), prior


# ---------------------------------------------------------------------------------------------------------------
# SPL: a prior per modality
# ---------------------------------------------------------------------------------------------------------------


class SPLModel(nn.Module):
    """SPL's network for one modality (Eqs. 1-2): an encoder and a trainable ``W_k`` (d x C, from
    ``initial_prior``), trained with the GCE at the epoch's hardness ``q`` (set by ``on_epoch_start``)."""

    def __init__(self, input_dim: int, initial_prior: torch.Tensor, settings: DRCLSettings, seed: int = 0):
        super().__init__()
        self.encoder = _encoder(input_dim, settings.hidden_dim, settings.embed_dim, seed)
        self.prior = nn.Parameter(initial_prior.detach().clone().float())     # (d, C), trained
        self.q_ramp_epochs = settings.q_ramp_epochs
        self.literal_q_at_epoch_zero = settings.literal_q_at_epoch_zero
        self.on_epoch_start(1)

    def on_epoch_start(self, epoch: int) -> None:
        self.q = hardness_q(epoch, self.q_ramp_epochs, literal_epoch_zero=self.literal_q_at_epoch_zero)

    def parameter_groups(self, lr: float) -> list[dict]:
        return _adam_groups(self)

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.encoder(batch["features"]) @ self.prior                  # (B, C)
        if not self.literal_q_at_epoch_zero:
            return {"loss": generalized_cross_entropy(logits, batch["labels"], self.q)}
        printed_nan = torch.tensor(float(self.q == 0), device=logits.device)
        if self.q == 0:
            # The authors' first epoch: (1 - p ** 0) / 0 prints NaN, but its gradient is exactly zero (pow's
            # backward at exponent 0), so Adam steps without moving anything and training goes on. fit stops on a
            # NaN loss, so train on the equivalent zero (same zero gradient, same Adam steps) and count the step
            # in "printed_nan" (the history's train_printed_nan is the share of steps that printed NaN).
            return {"loss": 0.0 * logits.sum(), "printed_nan": printed_nan}
        return {"loss": generalized_cross_entropy(logits, batch["labels"], self.q, literal=True),
                "printed_nan": printed_nan}

    @torch.no_grad()
    def quality(self, rows: Modality) -> float:
        """Eq. (2) on ``rows`` (SPL scores the training set)."""
        device = self.prior.device
        return quality_score(encode(self.encoder, rows.features, batch_size=1024, device=device),
                             rows.labels.to(device), self.prior)


@dataclass
class PriorLearning:
    """SPL on one modality: the kept ``W_k`` (d x C, on the CPU) and its training (``best_metrics``: the
    quality score of the best epoch)."""

    prior: torch.Tensor
    training: TrainResult

    @property
    def score(self) -> float:
        return self.training.best_metrics["quality_score"]

    @property
    def best_epoch(self) -> int:
        return self.training.best_epoch


def learn_prior(train: Modality, num_classes: int, initial_prior: torch.Tensor, settings: DRCLSettings,
                training: TrainConfig) -> PriorLearning:
    """SPL on one modality (Eqs. 1-2): train an encoder and ``W_k`` (from ``initial_prior``) with the GCE under
    the hardness schedule, at ``settings.spl_lr`` for at most ``settings.spl_max_epochs`` epochs, stopping after
    ``settings.spl_patience`` epochs without a training-set quality score better by ``settings.spl_min_delta``;
    keep the ``W_k`` of the best-scoring epoch (an epoch counts as better only by more than ``spl_min_delta``, so the
    kept ``W_k`` scores within that of the highest score; the last epoch's with ``prior_from_last_epoch``).
    ``training`` gives the batch size (capped by :func:`modality_batch_size`), seed and device."""
    if initial_prior.shape[1] != num_classes:
        raise ValueError(f"the initial prior has {initial_prior.shape[1]} columns for {num_classes} classes")
    model = SPLModel(train.features.shape[1], initial_prior, settings, training.seed)
    config = _modality_config(training, train, lr=settings.spl_lr, max_epochs=settings.spl_max_epochs,
                              patience=settings.spl_patience, min_delta=settings.spl_min_delta,
                              select_by="quality_score", select_mode="max")
    last: dict[str, torch.Tensor] = {}

    def validate(model: SPLModel) -> dict[str, float]:
        last["prior"] = model.prior.detach().cpu().clone()
        return {"quality_score": model.quality(train)}

    result = fit(model, train, config, validate)
    # fit restored the best epoch's W; the authors' live reference ends with the last epoch's
    prior = last["prior"] if settings.prior_from_last_epoch else model.prior.detach().cpu().clone()
    return PriorLearning(prior, result)


def select_prior(priors: Mapping[str, PriorLearning]) -> str:
    """SPL's selection: the modality whose prior has the highest quality score (Eq. 2)."""
    return max(priors, key=lambda name: priors[name].score)


# ---------------------------------------------------------------------------------------------------------------
# RSC: an encoder per modality against the frozen prior
# ---------------------------------------------------------------------------------------------------------------


class RSCModel(nn.Module):
    """RSC's network for one modality (Eqs. 3-8): a fresh encoder trained against the frozen prior ``W*`` with the
    settings' augmentation (FA, the input mixup of Table V #11, or none) and ``J`` of
    :class:`ReversibleConsistencyLoss` at the epoch's ``q`` (set by ``on_epoch_start``)."""

    def __init__(self, input_dim: int, prior: torch.Tensor, settings: DRCLSettings, seed: int = 0):
        super().__init__()
        self.encoder = _encoder(input_dim, settings.hidden_dim, settings.embed_dim, seed)
        self.objective = settings.loss(prior)
        self.num_classes = prior.shape[1]
        self.augmentation, self.mix_lambda = settings.augmentation, settings.mix_lambda
        self.schedule = settings.q                                              # epoch -> q (Eq. 7)
        self.on_epoch_start(1)

    def on_epoch_start(self, epoch: int) -> None:
        self.q = self.schedule(epoch)

    def parameter_groups(self, lr: float) -> list[dict]:
        return _adam_groups(self)

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        inputs, targets = batch["features"], _one_hot(batch["labels"], self.num_classes)   # (B, D), (B, C)
        if self.augmentation == "input":                                       # Table V #11: mixup of inputs
            inputs, targets, _ = feature_mixup(inputs, targets, self.mix_lambda)
        embeddings = self.encoder(inputs)                                       # (B, d)
        if self.augmentation == "embedding":                                   # FA, Eq. (3)
            embeddings, targets, _ = feature_mixup(embeddings, targets, self.mix_lambda)
        return self.objective(embeddings, targets, self.q)

    @torch.no_grad()
    def validation_loss(self, rows: Modality) -> float:
        """``J`` on ``rows`` without augmentation, at the epoch's ``q`` (as the authors' code)."""
        device = self.objective.prior.device
        embeddings = encode(self.encoder, rows.features, batch_size=1024, device=device)
        return float(self.objective(embeddings, _one_hot(rows.labels, self.num_classes).to(device), self.q)["loss"])


@dataclass
class ModalityTraining:
    """One modality's trained encoder (restored to its selected epoch) and its training (``best_metrics``: the
    validation ``loss`` of that epoch)."""

    encoder: nn.Module
    training: TrainResult

    @property
    def best_epoch(self) -> int:
        return self.training.best_epoch

    @property
    def best_validation_loss(self) -> float:
        return self.training.best_metrics["loss"]


def train_modality(train: Modality, val: Modality, num_classes: int, prior: torch.Tensor, settings: DRCLSettings,
                   training: TrainConfig) -> ModalityTraining:
    """RSC on one modality (Eqs. 3-8): a fresh encoder trained against the frozen prior; the epoch with the lowest
    validation loss (no augmentation, the epoch's ``q``, as the authors' code) is kept, and training stops after
    ``training.patience`` epochs without a lower one."""
    if prior.shape[1] != num_classes:
        raise ValueError(f"the prior has {prior.shape[1]} columns for {num_classes} classes")
    model = RSCModel(train.features.shape[1], prior, settings, training.seed)
    config = _modality_config(training, train, select_by="loss", select_mode="min")
    result = fit(model, train, config, lambda model: {"loss": model.validation_loss(val)})
    return ModalityTraining(model.encoder, result)


# ---------------------------------------------------------------------------------------------------------------
# The SDML-style baseline: a fixed prior, label regression and an auto-encoder
# ---------------------------------------------------------------------------------------------------------------


class SDMLModel(nn.Module):
    """SDML's per-modality network (Hu et al., SIGIR 2019): an encoder into the predefined common space of the
    fixed ``prior`` (d x C) and a decoder back to the input. Same encoder as DRCL (the SDML code uses 1024 hidden
    units and a biased last layer); the decoder mirrors it without the normalisation (SDML's code normalises its
    reconstruction too)."""

    def __init__(self, input_dim: int, hidden_dim: int, embed_dim: int, prior: torch.Tensor, seed: int = 0,
                 reconstruction_weight: float = 0.5):
        super().__init__()
        self.encoder = _encoder(input_dim, hidden_dim, embed_dim, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.decoder = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                         nn.ReLU(), nn.Linear(hidden_dim, input_dim))
        self.register_buffer("prior", prior.detach().float())                  # (d, C), fixed
        self.reconstruction_weight = reconstruction_weight

    def parameter_groups(self, lr: float) -> list[dict]:
        return _adam_groups(self)

    def training_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        targets = _one_hot(batch["labels"], self.prior.shape[1])               # (B, C)
        return sdml_losses(self, batch["features"], targets, self.prior, self.reconstruction_weight)

    @torch.no_grad()
    def validation_loss(self, rows: Modality) -> float:
        """The label term ``mean_i ||z_i W - y_i||_2`` on ``rows`` (SDML's code selects by it)."""
        embeddings = encode(self.encoder, rows.features, batch_size=1024, device=self.prior.device)
        targets = _one_hot(rows.labels, self.prior.shape[1]).to(self.prior.device)
        return float((embeddings @ self.prior - targets).norm(dim=1).mean())


def sdml_losses(model: SDMLModel, inputs: torch.Tensor, targets: torch.Tensor, prior: torch.Tensor,
                reconstruction_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """SDML's loss: ``(1 - a) mean_i ||z_i W - y_i||_2 + a mean_i ||g(z_i) - x_i||_2`` with the prior W fixed
    (a = 0.5, SDML's ``alpha``)."""
    embeddings = model.encoder(inputs)                                          # (B, d)
    label = (embeddings @ prior - targets).norm(dim=1).mean()
    reconstruction = (model.decoder(embeddings) - inputs).norm(dim=1).mean()
    total = (1 - reconstruction_weight) * label + reconstruction_weight * reconstruction
    return {"loss": total, "label": label, "reconstruction": reconstruction}


def rescale_to_unit_anchors(prior: torch.Tensor) -> torch.Tensor:
    """``W * s`` with ``s`` the mean norm of the rows of ``W^+`` (the recast class anchors), so that the anchors of
    the rescaled prior have unit norm on average. An orthonormal prior is unchanged.

    SDML regresses ``z W`` (``z`` of unit norm) onto one-hot labels. With orthonormal columns the only unit ``z``
    with ``z W = y_c`` is the anchor ``y_c W^+`` itself; a learned prior has larger columns (its anchors are
    shorter than 1), and then ``z = y W^+ + n`` fits the target for *any* ``n`` orthogonal to the columns, which
    leaves most of ``z`` unconstrained. Rescaling keeps the prior's directions and correlations and restores the
    scale SDML's loss assumes (Table VI does not say how the paper plugged its prior in)."""
    return prior * torch.linalg.pinv(prior.double()).norm(dim=1).mean().to(prior.dtype)




def train_sdml_modality(train: Modality, val: Modality, num_classes: int, prior: torch.Tensor, hidden_dim: int,
                        embed_dim: int, training: TrainConfig, reconstruction_weight: float = 0.5) -> ModalityTraining:
    """SDML-style training of one modality against a fixed prior; the epoch with the lowest validation label loss
    is kept (as SDML's code). ``prior`` is a random orthogonal matrix (SDML) or a learned one (Table VI)."""
    if prior.shape[1] != num_classes:
        raise ValueError(f"the prior has {prior.shape[1]} columns for {num_classes} classes")
    model = SDMLModel(train.features.shape[1], hidden_dim, embed_dim, prior, training.seed, reconstruction_weight)
    config = _modality_config(training, train, select_by="loss", select_mode="min")
    result = fit(model, train, config, lambda model: {"loss": model.validation_loss(val)})
    return ModalityTraining(model.encoder, result)


# ---------------------------------------------------------------------------------------------------------------
# Whole runs over every modality
# ---------------------------------------------------------------------------------------------------------------


def _learning_rate(lr: float | Mapping[str, float], modality: str) -> float:
    return float(lr[modality]) if isinstance(lr, Mapping) else float(lr)


@dataclass
class CrossModalRun:
    """A trained method on every modality: encoders, the prior used, and (for DRCL with SPL's prior) SPL's
    record of every modality."""

    method: str
    encoders: dict[str, ModalityTraining]
    prior: torch.Tensor
    prior_source: str                                    # a modality name, "random", "random_rescaled" or "given"
    priors: dict[str, PriorLearning] = field(default_factory=dict)
    wall_time_s: float = 0.0
    initial_prior: torch.Tensor | None = None            # SPL's random orthogonal starting matrix, where known

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.encoders.values())).encoder.parameters()).device

    def embed(self, split: Mapping[str, Modality]) -> dict[str, Modality]:
        """Common-space features (on the CPU) of every modality of a split (labels kept)."""
        embedded = {}
        for name, trained in self.encoders.items():
            device = next(trained.encoder.parameters()).device
            features = encode(trained.encoder, split[name].features, batch_size=1024, device=device)  # (N, d)
            embedded[name] = Modality(features.cpu(), split[name].labels)
        return embedded


def learn_priors(data: CrossModalData, settings: DRCLSettings, training: TrainConfig,
                 initial_seed: int | None = None) -> dict[str, PriorLearning]:
    """SPL on every modality, all from the same random orthogonal initial W."""
    initial = random_orthogonal_prior(settings.embed_dim, data.num_classes,
                                      training.seed if initial_seed is None else initial_seed)
    return {name: learn_prior(data.train[name], data.num_classes, initial, settings, training)
            for name in data.modalities}


def run_drcl(data: CrossModalData, settings: DRCLSettings, training: TrainConfig,
             lr: float | Mapping[str, float] | None = None, priors: Mapping[str, PriorLearning] | None = None,
             prior: str | torch.Tensor = "learned") -> CrossModalRun:
    """DRCL end to end: SPL (unless ``priors`` are given, e.g. shared between ablations of one seed), then RSC on
    every modality with the chosen prior.

    ``prior``: ``"learned"`` (SPL's selection), ``"random"`` (Table V #1: the random orthogonal W, no SPL),
    ``"random_rescaled"`` (the control: that random W with its columns rescaled to the norms of SPL's selected
    prior, :func:`match_column_norms`), a modality name (Fig. 3c: that modality's learned prior) or a (d, C) tensor.
    ``lr`` is RSC's learning rate, one for all modalities or per modality (default ``training.lr``). The run keeps
    SPL's records only when it uses SPL's prior.
    """
    started = time.perf_counter()
    initial = random_orthogonal_prior(settings.embed_dim, data.num_classes, training.seed)
    if isinstance(prior, torch.Tensor):
        chosen, source, used = prior, "given", {}
    elif prior == "random":
        chosen, source, used = initial, "random", {}
    elif prior == "random_rescaled":
        learned = dict(priors) if priors else learn_priors(data, settings, training)
        chosen, source, used = match_column_norms(initial, learned[select_prior(learned)].prior), prior, {}
    else:
        used = dict(priors) if priors else learn_priors(data, settings, training)
        if prior != "learned" and prior not in used:
            raise ValueError(f"prior must be 'learned', 'random', 'random_rescaled', a modality of {list(used)} or "
                             f"a tensor, got {prior!r}")
        source = select_prior(used) if prior == "learned" else prior
        chosen = used[source].prior
    encoders = {}
    for name in data.modalities:
        modality_training = dataclasses.replace(training, lr=_learning_rate(training.lr if lr is None else lr, name))
        encoders[name] = train_modality(data.train[name], data.val[name], data.num_classes, chosen, settings,
                                        modality_training)
    return CrossModalRun("drcl", encoders, chosen, source, used, time.perf_counter() - started, initial)


def run_sdml(data: CrossModalData, hidden_dim: int, embed_dim: int, training: TrainConfig,
             prior: torch.Tensor | None = None, lr: float | Mapping[str, float] | None = None,
             reconstruction_weight: float = 0.5) -> CrossModalRun:
    """The SDML-style baseline on every modality: a fixed random orthogonal prior, or ``prior`` (Table VI)."""
    started = time.perf_counter()
    source = "random" if prior is None else "given"
    if prior is None:
        prior = random_orthogonal_prior(embed_dim, data.num_classes, training.seed)
    encoders = {}
    for name in data.modalities:
        modality_training = dataclasses.replace(training, lr=_learning_rate(training.lr if lr is None else lr, name))
        encoders[name] = train_sdml_modality(data.train[name], data.val[name], data.num_classes, prior, hidden_dim,
                                             embed_dim, modality_training, reconstruction_weight)
    return CrossModalRun("sdml", encoders, prior, source, {}, time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------------------
# What a run leaves behind: metrics, per-query APs, the training record, a result file
# ---------------------------------------------------------------------------------------------------------------


def run_history(run: CrossModalRun) -> list[dict]:
    """One row per stage, modality and epoch (``TrainResult.history``): ``stage`` is ``"prior"``
    (SPL; its ``val_quality_score`` is Eq. 2 on the training split) or ``"encoder"`` (RSC or SDML; ``val_loss``)."""
    rows = [{"stage": "prior", "modality": name, **row} for name, learned in run.priors.items()
            for row in learned.training.history]
    rows += [{"stage": "encoder", "modality": name, **row} for name, trained in run.encoders.items()
             for row in trained.training.history]
    return rows


def run_result_fields(run: CrossModalRun, data: CrossModalData) -> dict:
    """What a result file holds of a run: the ``metrics``, ``per_query``, ``training``, ``history`` and ``extra``
    arguments of :func:`xmr.results.write_result`.

    - ``metrics``: test MAP@all / MAP@50 of every ordered pair and their averages
      (:func:`xmr.category_retrieval.map_evaluation`), and the validation MAP@all average ``val_map_all_avg``;
    - ``per_query``: the per-query APs behind the test MAPs;
    - ``training``: one stage per step and modality, ``prior_<modality>`` (SPL) and ``encoder_<modality>``, each
      a :meth:`xmr.train.TrainResult.record` (budget, epochs run, best epoch, plateau or budget);
    - ``history``: :func:`run_history`;
    - ``extra``: the method, the prior's source and its :func:`prior_geometry`, SPL's quality scores and the
      geometry of every modality's learned prior, the test precision-recall curves of every ordered pair (Fig. 2,
      :func:`xmr.category_retrieval.pr_curves`), the data's description and sizes.
    """
    test_features = run.embed(data.test)
    metrics, per_query = map_evaluation(test_features, paired=data.paired, weak_views=data.weak_views)
    metrics["val_map_all_avg"] = map_table(run.embed(data.val), ks=(None,))["map_all_avg"]
    stages = {f"prior_{name}": learned.training.record() for name, learned in run.priors.items()}
    stages.update({f"encoder_{name}": trained.training.record() for name, trained in run.encoders.items()})
    extra = {"method": run.method, "prior_source": run.prior_source,
             "prior_geometry": prior_geometry(run.prior, run.initial_prior),
             "quality_scores": {name: learned.score for name, learned in run.priors.items()},
             "learned_prior_geometry": {name: prior_geometry(learned.prior, run.initial_prior)
                                        for name, learned in run.priors.items()},
             "pr_curves": pr_curves(test_features), "data": data.description, "sizes": data.sizes()}
    return {"metrics": metrics, "per_query": per_query, "training": staged_training(stages),
            "history": run_history(run), "extra": extra}


def record_run(results_dir, run_name: str, run: CrossModalRun, data: CrossModalData, dataset: str,
               parameters: Mapping) -> dict[str, float]:
    """Write ``<results_dir>/drcl2024/<run_name>.json`` (schema version 2, :func:`run_result_fields`) for a trained
    run and return its metrics."""
    fields = run_result_fields(run, data)
    write_result(results_dir, "drcl2024", run_name, parameters=dict(parameters), dataset=dataset, split="test",
                 device=run.device, **fields)
    return fields["metrics"]
