"""DRCL: selective prior learning (SPL) and reversible semantic consistency (RSC) for category-based retrieval.

Pu et al., "Deep Reversible Consistency Learning for Cross-modal Retrieval" (IEEE TMM 2025; arXiv 2024). The
paper's equations were lost in its text extraction; ``../shared/papers/METHOD_NOTES.md`` rebuilds them from the
authors' code (github.com/QinYang79/DRCL), which this module follows. Equation numbers are the paper's.

Every modality ``k`` has its own encoder ``f_k`` (:class:`ModalityEncoder`) and is trained alone, so any number of
modalities, with any number of (unpaired) samples each, can be used. Two stages:

1. **SPL** (:func:`learn_prior`, :func:`select_prior`). On every modality, an encoder and a matrix
   ``W_k`` (d x C, initialised as the first C columns of a random orthogonal d x d matrix, the same for every
   modality) are trained with the generalised cross-entropy (Eq. 1, :func:`generalized_cross_entropy`)
   ``mean_i [1 - softmax(z_i W_k)_{y_i} ** q] / q`` under the hardness schedule ``q_t = min(1, 0.01 t)``
   (:func:`hardness_q`, ``t`` = epoch from 1). The quality score (Eq. 2, :func:`quality_score`) is the mean
   true-class probability on the training set; each modality keeps the ``W_k`` of its best-scoring epoch, and the
   prior ``W*`` is the ``W_k`` with the highest score.
2. **RSC** (:class:`ReversibleConsistencyLoss`, :func:`train_modality`). With ``W*`` frozen, every modality
   trains a fresh encoder: feature mixup in the common space (FA, Eq. 3, :func:`feature_mixup`,
   ``lambda = 0.9``), class anchors recast through the pseudo-inverse (MRR, Eq. 4, :func:`recast_anchors`,
   ``r_i = y'_i W*^+``), and ``J = J_L + alpha J_D + beta J_MSE`` (Eqs. 5-8, alpha = beta = 0.1). The epoch with
   the lowest validation loss is kept.

The baselines of the comparison are here too: :func:`train_sdml_modality` (SDML, Hu et al. SIGIR 2019: a fixed
random orthogonal prior, a label regression loss and an auto-encoder), and CCA in :mod:`xmr.methods.cca`.

Known bugs of the authors' code are kept only as flagged variants (:class:`DRCLSettings`):
``literal_q_at_epoch_zero`` (SPL's ``q = 0.01 * epoch`` with the epoch counted from 0: ``q = 0`` and a 0/0 = NaN
loss in the first epoch) and ``prior_from_last_epoch`` (the code keeps a live reference to ``W``, so the "best"
prior is the last epoch's, not the best-scoring epoch's).

Why not :func:`xmr.train.fit`: its batches are rows of a per-item ``Dataset`` with an ``"image"`` key, and it
selects the epoch with the *highest* validation metric. DRCL trains one modality at a time on small in-memory
tensors (plain index batches, no per-item ``DataLoader`` collation), selects by the *lowest* validation loss in
RSC and by the highest training-set score in SPL, and changes ``q`` every epoch; :func:`fit_modality` is the
short loop that does exactly that.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import mean_average_precision, precision_recall_curve
from ..train import check_finite_losses

# ---------------------------------------------------------------------------------------------------------------
# Data: one labelled feature matrix per modality and split
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Modality:
    """The samples of one modality in one split: features (N, D) and class labels (N,). Modalities of a split
    need not be paired or of equal size."""

    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor    # (N,) int64, 0 ... C-1

    def __post_init__(self) -> None:
        if self.features.dim() != 2 or self.labels.dim() != 1 or len(self.features) != len(self.labels):
            raise ValueError(f"features (N, D) and labels (N,) disagree: {tuple(self.features.shape)} vs "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CrossModalData:
    """Train / validation / test samples of every modality, and the number of classes."""

    train: dict[str, Modality]
    val: dict[str, Modality]
    test: dict[str, Modality]
    num_classes: int
    description: str = ""

    @property
    def modalities(self) -> list[str]:
        return list(self.train)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {name: {"train": len(self.train[name]), "val": len(self.val[name]), "test": len(self.test[name]),
                       "dim": self.train[name].features.shape[1]} for name in self.modalities}


def stratified_split(labels: torch.Tensor, sizes: Mapping[str, float], seed: int = 0) -> dict[str, torch.Tensor]:
    """Disjoint index sets with the class proportions of ``labels``: ``sizes`` maps a part name to its fraction
    of every class (the fractions sum to 1; rounding goes to the last part). Seeded, so the split is fixed."""
    if abs(sum(sizes.values()) - 1.0) > 1e-9:
        raise ValueError(f"the fractions must sum to 1, got {dict(sizes)}")
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    names = list(sizes)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for position, name in enumerate(names):
            count = len(members) - start if position == len(names) - 1 else round(sizes[name] * len(members))
            parts[name].append(members[start:start + count])
            start += count
    return {name: torch.sort(torch.cat(chunks)).values for name, chunks in parts.items()}


def standardise(data: CrossModalData) -> CrossModalData:
    """z-score every feature with the training split's mean and standard deviation (per modality)."""
    def scaled(split: dict[str, Modality], name: str, mean: torch.Tensor, std: torch.Tensor) -> Modality:
        return Modality((split[name].features - mean) / std, split[name].labels)

    parts: dict[str, dict[str, Modality]] = {"train": {}, "val": {}, "test": {}}
    for name in data.modalities:
        features = data.train[name].features
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        for part in parts:
            parts[part][name] = scaled(getattr(data, part), name, mean, std)
    return dataclasses.replace(data, **parts)


def wikipedia_data(root=None, val_fraction: float = 1 / 3, seed: int = 0, scale: bool = True) -> CrossModalData:
    """Wikipedia (SIFT 128-d images, LDA 10-d texts): the standard 2173 training pairs; the 693 test pairs split,
    stratified and seeded, into validation and test as the paper does (231 / 462 at ``val_fraction = 1/3``)."""
    from ..data import load_wikipedia

    train, test = load_wikipedia("train", root), load_wikipedia("test", root)
    parts = stratified_split(test.labels, {"val": val_fraction, "test": 1 - val_fraction}, seed)
    data = CrossModalData(
        train={view: Modality(train.views[view], train.labels) for view in train.views},
        val={view: Modality(test.views[view][parts["val"]], test.labels[parts["val"]]) for view in test.views},
        test={view: Modality(test.views[view][parts["test"]], test.labels[parts["test"]]) for view in test.views},
        num_classes=len(train.class_names),
        description=f"Wikipedia SIFT/LDA: 2173 train; the 693 test pairs split {len(parts['val'])} validation / "
                    f"{len(parts['test'])} test (stratified, seed {seed})",
    )
    return standardise(data) if scale else data


def uci_mfeat_data(root=None, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
                   scale: bool = True) -> CrossModalData:
    """UCI Multiple Features (6 views of 2000 digits): a seeded stratified train / validation / test split (the
    dataset has no official split)."""
    from ..data import load_uci_mfeat

    views = load_uci_mfeat(root)
    parts = stratified_split(views.labels, dict(zip(("train", "val", "test"), fractions)), seed)
    data = CrossModalData(
        **{part: {view: Modality(views.views[view][index], views.labels[index]) for view in views.views}
           for part, index in parts.items()},
        num_classes=len(views.class_names),
        description=f"UCI multiple features, 6 views: seeded stratified split {len(parts['train'])} / "
                    f"{len(parts['val'])} / {len(parts['test'])} (seed {seed})",
    )
    return standardise(data) if scale else data


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
# Training one modality
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """How one modality is optimised (Adam with the authors' betas; the last partial batch is dropped)."""

    epochs: int = 200            # paper: 200 (Wikipedia), 300 (XMedia)
    batch_size: int = 100        # paper: 1024, which leaves no batch for modalities with < 1024 samples
    lr: float = 5e-4             # paper: per modality (Wikipedia image 6e-6, text 5e-3); SPL 5e-4
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 0
    device: str = "cpu"


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    history: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


def fit_modality(model: nn.Module, num_samples: int, batch_losses: Callable[[torch.Tensor, int], dict],
                 score: Callable[[int], float], settings: TrainSettings, maximise: bool,
                 generator: torch.Generator) -> FitResult:
    """Train ``model`` for ``settings.epochs`` epochs of shuffled index batches and restore its best epoch.

    ``batch_losses(indices, epoch)`` returns the named losses of one batch (total under ``"loss"``);
    ``score(epoch)`` rates the model after each epoch (the lower the better unless ``maximise``).
    """
    if num_samples < settings.batch_size:
        raise ValueError(f"{num_samples} training samples make no batch of {settings.batch_size} (the authors' "
                         "loop drops the partial batch and would not train at all): lower the batch size")
    started = time.perf_counter()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                 betas=settings.betas)
    result, best_state = FitResult(best_epoch=0, best_score=-math.inf if maximise else math.inf), None
    batches = num_samples // settings.batch_size
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = torch.randperm(num_samples, generator=generator)
        sums: dict[str, float] = {}
        for step in range(batches):
            losses = batch_losses(order[step * settings.batch_size:(step + 1) * settings.batch_size], epoch)
            check_finite_losses(losses, epoch, step + 1)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        model.eval()
        value = float(score(epoch))
        row = {"epoch": epoch, **{f"train_{name}": total / batches for name, total in sums.items()}, "score": value}
        result.history.append(row)
        if (value > result.best_score) if maximise else (value < result.best_score):
            result.best_epoch, result.best_score = epoch, value
            best_state = copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    result.wall_time_s = time.perf_counter() - started
    return result


def _encoder(input_dim: int, hidden_dim: int, embed_dim: int, seed: int) -> ModalityEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ModalityEncoder(input_dim, hidden_dim, embed_dim)


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(labels, num_classes).float()


@torch.no_grad()
def encode(encoder: nn.Module, features: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Embeddings (N, d) of ``features`` in eval mode, on the encoder's device, returned on the CPU."""
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = torch.cat([encoder(features[start:start + batch_size].to(device)).float().cpu()
                     for start in range(0, len(features), batch_size)])
    encoder.train(was_training)
    return out


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
    literal_q_at_epoch_zero: bool = False  # code bug: SPL's first epoch has q = 0 (NaN loss)
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
#: DRCLSettings, plus ``prior`` for run_drcl. "transpose_recast" is not a paper variant.
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
}


def ablation(settings: DRCLSettings, variant: str) -> tuple[DRCLSettings, str]:
    """The settings and the ``prior`` argument of :func:`run_drcl` for one of :data:`TABLE5_VARIANTS`."""
    changes = dict(TABLE5_VARIANTS[variant][1])
    prior = changes.pop("prior", "learned")
    return dataclasses.replace(settings, **changes), prior

@dataclass
class PriorLearning:
    """SPL on one modality: the kept ``W_k`` (d x C), its quality score and epoch, and the per-epoch scores."""

    prior: torch.Tensor
    score: float
    best_epoch: int
    history: list[dict]
    wall_time_s: float


def learn_prior(train: Modality, num_classes: int, initial_prior: torch.Tensor, settings: DRCLSettings,
                training: TrainSettings) -> PriorLearning:
    """SPL on one modality (Eqs. 1-2): train an encoder and ``W_k`` (from ``initial_prior``) with the GCE under
    the hardness schedule; keep the ``W_k`` of the epoch with the best training-set quality score."""
    device = torch.device(training.device)
    encoder = _encoder(train.features.shape[1], settings.hidden_dim, settings.embed_dim, training.seed).to(device)
    encoder.prior = nn.Parameter(initial_prior.detach().clone().to(device))     # (d, C), trained
    features, labels = train.features.to(device), train.labels.to(device)

    def batch_losses(index: torch.Tensor, epoch: int) -> dict:
        q = hardness_q(epoch, settings.q_ramp_epochs, literal_epoch_zero=settings.literal_q_at_epoch_zero)
        logits = encoder(features[index]) @ encoder.prior                       # (B, C)
        return {"loss": generalized_cross_entropy(logits, labels[index], q, literal=settings.literal_q_at_epoch_zero)}

    last: dict[str, torch.Tensor] = {}

    def score(epoch: int) -> float:
        last["prior"] = encoder.prior.detach().cpu().clone()
        return quality_score(encode(encoder, features), labels.cpu(), last["prior"])

    generator = torch.Generator().manual_seed(training.seed)
    fitted = fit_modality(encoder, len(train), batch_losses, score, dataclasses.replace(training, lr=settings.spl_lr),
                          maximise=True, generator=generator)
    # the best epoch's W (restored with the encoder), or, as the authors' live reference does, the last epoch's
    prior = last["prior"] if settings.prior_from_last_epoch else encoder.prior.detach().cpu().clone()
    return PriorLearning(prior, fitted.best_score, fitted.best_epoch, fitted.history, fitted.wall_time_s)


def select_prior(priors: Mapping[str, PriorLearning]) -> str:
    """SPL's selection: the modality whose prior has the highest quality score (Eq. 2)."""
    return max(priors, key=lambda name: priors[name].score)


@dataclass
class ModalityTraining:
    """One modality's trained encoder (restored to its selected epoch) and its training record."""

    encoder: nn.Module
    best_epoch: int
    best_validation_loss: float
    history: list[dict]
    wall_time_s: float


def train_modality(train: Modality, val: Modality, num_classes: int, prior: torch.Tensor, settings: DRCLSettings,
                   training: TrainSettings) -> ModalityTraining:
    """RSC on one modality (Eqs. 3-8): a fresh encoder trained against the frozen prior; the epoch with the lowest
    validation loss (no augmentation, the epoch's ``q``, as the authors' code) is kept."""
    device = torch.device(training.device)
    encoder = _encoder(train.features.shape[1], settings.hidden_dim, settings.embed_dim, training.seed).to(device)
    objective = settings.loss(prior).to(device)
    features, targets = train.features.to(device), _one_hot(train.labels, num_classes).to(device)
    val_features, val_targets = val.features.to(device), _one_hot(val.labels, num_classes).to(device)
    generator = torch.Generator().manual_seed(training.seed)
    mixing = torch.Generator().manual_seed(training.seed + 1)

    def batch_losses(index: torch.Tensor, epoch: int) -> dict:
        inputs, labels = features[index], targets[index]                         # (B, D), (B, C)
        if settings.augmentation == "input":                                    # Table V #11: mixup of inputs
            inputs, labels, _ = feature_mixup(inputs, labels, settings.mix_lambda, mixing)
        embeddings = encoder(inputs)                                             # (B, d)
        if settings.augmentation == "embedding":                                # FA, Eq. (3)
            embeddings, labels, _ = feature_mixup(embeddings, labels, settings.mix_lambda, mixing)
        return objective(embeddings, labels, settings.q(epoch))

    @torch.no_grad()
    def validation_loss(epoch: int) -> float:
        return float(objective(encoder(val_features), val_targets, settings.q(epoch))["loss"])

    fitted = fit_modality(encoder, len(train), batch_losses, validation_loss, training, maximise=False,
                          generator=generator)
    return ModalityTraining(encoder, fitted.best_epoch, fitted.best_score, fitted.history, fitted.wall_time_s)


# ---------------------------------------------------------------------------------------------------------------
# The SDML-style baseline: a fixed prior, label regression and an auto-encoder
# ---------------------------------------------------------------------------------------------------------------


class SDMLModel(nn.Module):
    """SDML's per-modality network (Hu et al., SIGIR 2019): an encoder into the predefined common space and a
    decoder back to the input. Same encoder as DRCL (the SDML code uses 1024 hidden units and a biased last
    layer); the decoder mirrors it without the normalisation (SDML's code normalises its reconstruction too)."""

    def __init__(self, input_dim: int, hidden_dim: int, embed_dim: int, seed: int = 0):
        super().__init__()
        self.encoder = _encoder(input_dim, hidden_dim, embed_dim, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.decoder = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                         nn.ReLU(), nn.Linear(hidden_dim, input_dim))


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
                        embed_dim: int, training: TrainSettings, reconstruction_weight: float = 0.5) -> ModalityTraining:
    """SDML-style training of one modality against a fixed prior; the epoch with the lowest validation label loss
    is kept (as SDML's code). ``prior`` is a random orthogonal matrix (SDML) or a learned one (Table VI)."""
    device = torch.device(training.device)
    model = SDMLModel(train.features.shape[1], hidden_dim, embed_dim, training.seed).to(device)
    prior = prior.detach().float().to(device)
    features, targets = train.features.to(device), _one_hot(train.labels, num_classes).to(device)
    val_features, val_targets = val.features.to(device), _one_hot(val.labels, num_classes).to(device)

    def batch_losses(index: torch.Tensor, epoch: int) -> dict:
        return sdml_losses(model, features[index], targets[index], prior, reconstruction_weight)

    @torch.no_grad()
    def validation_loss(epoch: int) -> float:
        return float((model.encoder(val_features) @ prior - val_targets).norm(dim=1).mean())

    fitted = fit_modality(model, len(train), batch_losses, validation_loss, training, maximise=False,
                          generator=torch.Generator().manual_seed(training.seed))
    return ModalityTraining(model.encoder, fitted.best_epoch, fitted.best_score, fitted.history, fitted.wall_time_s)


# ---------------------------------------------------------------------------------------------------------------
# Whole runs over every modality, and their evaluation
# ---------------------------------------------------------------------------------------------------------------


def _learning_rate(lr: float | Mapping[str, float], modality: str) -> float:
    return float(lr[modality]) if isinstance(lr, Mapping) else float(lr)


@dataclass
class CrossModalRun:
    """A trained method on every modality: encoders, the prior used, and (for DRCL) SPL's record."""

    method: str
    encoders: dict[str, ModalityTraining]
    prior: torch.Tensor
    prior_source: str                                    # a modality name, "random", or "given"
    priors: dict[str, PriorLearning] = field(default_factory=dict)
    wall_time_s: float = 0.0

    def embed(self, split: Mapping[str, Modality]) -> dict[str, Modality]:
        """Common-space features of every modality of a split (labels kept)."""
        return {name: Modality(encode(self.encoders[name].encoder, split[name].features), split[name].labels)
                for name in self.encoders}


def learn_priors(data: CrossModalData, settings: DRCLSettings, training: TrainSettings,
                 initial_seed: int | None = None) -> dict[str, PriorLearning]:
    """SPL on every modality, all from the same random orthogonal initial W."""
    initial = random_orthogonal_prior(settings.embed_dim, data.num_classes,
                                      training.seed if initial_seed is None else initial_seed)
    return {name: learn_prior(data.train[name], data.num_classes, initial, settings, training)
            for name in data.modalities}


def run_drcl(data: CrossModalData, settings: DRCLSettings, training: TrainSettings,
             lr: float | Mapping[str, float] | None = None, priors: Mapping[str, PriorLearning] | None = None,
             prior: str | torch.Tensor = "learned") -> CrossModalRun:
    """DRCL end to end: SPL (unless ``priors`` are given, e.g. shared between ablations of one seed), then RSC on
    every modality with the chosen prior.

    ``prior``: ``"learned"`` (SPL's selection), ``"random"`` (Table V #1: the random orthogonal W, no SPL), a
    modality name (Fig. 3c: that modality's learned prior) or a (d, C) tensor. ``lr`` is RSC's learning rate, one
    for all modalities or per modality (default ``training.lr``).
    """
    started = time.perf_counter()
    priors = dict(priors) if priors is not None else {}
    if isinstance(prior, torch.Tensor):
        chosen, source = prior, "given"
    elif prior == "random":
        chosen, source = random_orthogonal_prior(settings.embed_dim, data.num_classes, training.seed), "random"
    else:
        if not priors:
            priors = learn_priors(data, settings, training)
        source = select_prior(priors) if prior == "learned" else prior
        chosen = priors[source].prior
    encoders = {}
    for name in data.modalities:
        modality_training = dataclasses.replace(training, lr=_learning_rate(lr if lr is not None else training.lr, name))
        encoders[name] = train_modality(data.train[name], data.val[name], data.num_classes, chosen, settings,
                                        modality_training)
    return CrossModalRun("drcl", encoders, chosen, source, priors, time.perf_counter() - started)


def run_sdml(data: CrossModalData, hidden_dim: int, embed_dim: int, training: TrainSettings,
             prior: torch.Tensor | None = None, lr: float | Mapping[str, float] | None = None,
             reconstruction_weight: float = 0.5) -> CrossModalRun:
    """The SDML-style baseline on every modality: a fixed random orthogonal prior, or ``prior`` (Table VI)."""
    started = time.perf_counter()
    source = "random" if prior is None else "given"
    if prior is None:
        prior = random_orthogonal_prior(embed_dim, data.num_classes, training.seed)
    encoders = {}
    for name in data.modalities:
        modality_training = dataclasses.replace(training, lr=_learning_rate(lr if lr is not None else training.lr, name))
        encoders[name] = train_sdml_modality(data.train[name], data.val[name], data.num_classes, prior, hidden_dim,
                                             embed_dim, modality_training, reconstruction_weight)
    return CrossModalRun("sdml", encoders, prior, source, {}, time.perf_counter() - started)


def cross_modal_map(features: Mapping[str, Modality], k: int | None = None) -> dict[tuple[str, str], float]:
    """MAP@k (MAP@all for ``k=None``) of every ordered modality pair (query modality, gallery modality)."""
    return {(query, gallery): mean_average_precision(features[query].features, features[query].labels,
                                                     features[gallery].features, features[gallery].labels, k=k)
            for query in features for gallery in features if query != gallery}


def map_table(features: Mapping[str, Modality], ks: tuple[int | None, ...] = (None, 50)) -> dict[str, float]:
    """Flat metrics of a run: ``map_all_<query>2<gallery>``, ``map_50_...`` for every ordered pair and their
    averages ``map_all_avg``, ``map_50_avg`` (the paper's "Avg": the mean over ordered pairs)."""
    metrics: dict[str, float] = {}
    for k in ks:
        tag = "all" if k is None else str(k)
        pairs = cross_modal_map(features, k)
        metrics.update({f"map_{tag}_{query}2{gallery}": value for (query, gallery), value in pairs.items()})
        metrics[f"map_{tag}_avg"] = sum(pairs.values()) / len(pairs)
    return metrics


def pr_curves(features: Mapping[str, Modality], num_points: int = 11) -> dict[str, list[float]]:
    """Interpolated precision-recall curves (Fig. 2) of every ordered pair, keyed ``<query>2<gallery>``."""
    curves = {}
    for query in features:
        for gallery in features:
            if query != gallery:
                _, precision = precision_recall_curve(features[query].features, features[query].labels,
                                                      features[gallery].features, features[gallery].labels,
                                                      num_points)
                curves[f"{query}2{gallery}"] = precision.tolist()
    return curves


# ---------------------------------------------------------------------------------------------------------------
# What a run leaves behind: metrics, per-epoch history, a result file
# ---------------------------------------------------------------------------------------------------------------


def run_metrics(run: CrossModalRun, data: CrossModalData) -> dict[str, float]:
    """Test MAP@all / MAP@50 of every ordered pair and their averages, the validation MAP@all average, each
    modality's selected epoch and (for DRCL) each modality's SPL quality score."""
    metrics = map_table(run.embed(data.test))
    metrics["val_map_all_avg"] = map_table(run.embed(data.val), ks=(None,))["map_all_avg"]
    metrics.update({f"best_epoch_{name}": trained.best_epoch for name, trained in run.encoders.items()})
    metrics.update({f"quality_score_{name}": record.score for name, record in run.priors.items()})
    return metrics


def run_history(run: CrossModalRun) -> list[dict]:
    """One row per modality, stage and epoch: ``stage`` is ``"spl"`` (score = training-set quality score) or the
    method's training (score = validation loss)."""
    rows = [{"stage": "spl", "modality": name, **row} for name, record in run.priors.items() for row in record.history]
    rows += [{"stage": run.method, "modality": name, **row} for name, trained in run.encoders.items()
             for row in trained.history]
    return rows


def record_run(results_dir, run_name: str, run: CrossModalRun, data: CrossModalData, dataset: str,
               parameters: Mapping, metrics: Mapping | None = None) -> dict:
    """Write ``<results_dir>/drcl2024/<run_name>.json`` for a trained run and return its metrics."""
    from ..results import write_result

    metrics = dict(metrics) if metrics is not None else run_metrics(run, data)
    write_result(results_dir, "drcl2024", run_name, parameters=dict(parameters), dataset=dataset, split="test",
                 metrics=metrics, history=run_history(run), wall_time_s=run.wall_time_s,
                 device=next(iter(run.encoders.values())).encoder.representation.weight.device,
                 extra={"method": run.method, "prior_source": run.prior_source, "data": data.description,
                        "sizes": data.sizes()})
    return metrics
