"""Intra-modal semantic unification, then a cross-modal linear mapping (shi2024).

Shi & Li, "Rethinking Semantic Contrastive Learning and Content Fusion in Multimodal Retrieval". No public code
exists; ``../shared/papers/METHOD_NOTES.md`` records the reading followed here. Equation numbers are the paper's.

The paper trains three things one after the other, each with a single responsibility (Sec. 3, Fig. 1):

1. **Text semantic space** (Sec. 3.1, Eqs. 1-2): texts with the same semantics are a positive set, the others
   negatives; the text encoder is trained so that a positive set clusters.
2. **Image semantic space** (Sec. 3.2, Eqs. 3-4): the same for images "of the same type".
3. **Semantic shared space** (Sec. 3.3): with both spaces fixed, "a linear layer" reduces "the distance between
   all feature pairs"; it can be retrained at any time on its own, with few parameters.

**Eqs. (2)/(4) cannot work as printed.** ``L = sum_i | ||F_i - F_{i+1}|| + F_i . F_{i+1} |`` has no negatives,
and for unit vectors at cosine ``c`` a term is ``sqrt(2 - 2c) + c``: 1 at ``c = 1`` *and* at ``c = -1`` (its
maximum, 1.5, is at ``c = 1/2``), so it cannot tell a positive pair from an opposite one, and every feature
collapsing onto one point is a global minimum. The faithful reading, used by default, is **supervised
contrastive learning** within the modality (:class:`SemanticContrastiveLoss`; Khosla et al. 2020, the
"L_out" form): positives are the other members of the anchor's set, negatives everything else in the batch.
``printed_formula=True`` runs Eq. (2) as printed, over consecutive members of each positive set.

What is a positive set here:

- *text*: the captions of the same image (:class:`CaptionGroups`: one item = all 5 captions of an image);
- *images*: views of the same image and, where classes exist, images of the same class
  (:class:`RegionCropViews`). The project trains on cached backbone features, not pixels, so a "view" is a
  random crop of the backbone's final 7 x 7 region grid, mean-pooled: the full grid's mean is exactly the pooled
  feature used everywhere else, and a crop keeps the regions of a sub-rectangle of the image (each region's
  receptive field is larger than its cell, so this is milder than a pixel crop). Flickr8k has no classes.

At the project's CPU scale the "encoders" being trained are the projection heads on frozen EfficientNet-Lite0
and all-MiniLM-L6-v2 features: the same heads as the joint baseline (:func:`xmr.experiment.run_dual_encoder`),
so the comparison isolates the training scheme. Stage 3 (:class:`MappedDualEncoder`) maps the image space into
the text space with one ``nn.Linear`` (``map_from="text"`` maps the other way) and trains only that layer, on
the frozen spaces' features encoded once (:func:`train_mapping`; :func:`map_spaces` maps any two frozen spaces,
e.g. the backbones' own, :class:`PretrainedSpace`). Its objective is read two ways: Fig. 4 is captioned
"contrastive learning with the same feature semantics", so the default is InfoNCE on the pairs (the joint
baseline's loss too); the text of Sec. 3.3, "reducing the distance between all feature pairs", is
:class:`PairDistanceLoss` (``mapping_loss="distance"``).

Also here: caption-to-caption retrieval (:func:`caption_retrieval_metrics`; the other captions of the query's
image are the relevant ones), used to select the text space and for the cross-dataset test of Table 3's spirit.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data import PairedFeatures, load_flickr8k
from ..encoders import IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM, ImageBackbone, ProjectionHead, count_trainable_parameters
from ..experiment import CaptionInputs
from ..features import ExtractionSettings, image_features
from ..losses import InfoNCELoss
from ..results import staged_training, write_result
from ..train import TrainConfig, TrainResult, encode, evaluate_retrieval_per_query, fit

PAPER_ID = "shi2024"
STAGES = ("text_space", "image_space", "mapping")


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------

def printed_term_of_cosine(cosine: torch.Tensor) -> torch.Tensor:
    """One term of Eq. (2)/(4) for two unit vectors at cosine ``c``: ``|sqrt(2 - 2c) + c|`` (for plots)."""
    return ((2 - 2 * cosine).clamp(min=0).sqrt() + cosine).abs()


class SemanticContrastiveLoss(nn.Module):
    """Within-modality contrastive loss of Secs. 3.1-3.2 over (N, D) L2-normalised features with set labels.

    Default, the faithful reading: supervised contrastive learning (SupCon "L_out", Khosla et al. 2020). With
    ``s_ij = f_i . f_j / temperature``, ``P(i)`` the other items with ``i``'s label and ``A(i)`` all items but
    ``i``: ``loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )``, averaged over the
    anchors that have a positive (0 when none has). The paper gives no temperature: 0.1 (SupCon's best).

    ``printed_formula=True``: Eq. (2)/(4) as printed, ``sum_i | ||F_i - F_{i+1}|| + F_i . F_{i+1} |`` over rows
    ``i, i+1`` that share a label (consecutive members of a positive set; all consecutive rows when ``labels``
    is None). It is minimised by cosine 1 and cosine -1 alike and by a collapse of every feature onto one point;
    it is kept only to show that (see the module docstring).
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


class PairDistanceLoss(nn.Module):
    """Stage 3 as printed (Sec. 3.3): reduce the distance between the features of each image-text pair.

    ``loss = mean_i ||image_i - text_i||^2`` over (B, D) L2-normalised features, i.e. ``2 - 2 cos``: the mapped
    image is pulled onto its caption in the (fixed) text space. No negatives are needed because the target
    space is frozen: the mapping cannot collapse it.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        if image_features.dim() != 2 or image_features.shape != text_features.shape or len(image_features) == 0:
            raise ValueError(f"expected two non-empty (B, D) tensors of the same shape, got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        squared = (image_features - text_features).pow(2).sum(dim=1)  # (B,)
        return {"loss": squared.mean(), "pair_cosine": (image_features * text_features).sum(dim=1).mean().detach()}


def make_mapping_loss(name: str, temperature: float = 0.07) -> nn.Module:
    """``"distance"`` (:class:`PairDistanceLoss`, the paper's) or ``"infonce"`` (:class:`xmr.losses.InfoNCELoss`)."""
    if name == "distance":
        return PairDistanceLoss()
    if name == "infonce":
        return InfoNCELoss(temperature=temperature)
    raise ValueError(f"unknown mapping loss {name!r}: use 'distance' or 'infonce'")


# ---------------------------------------------------------------------------------------------------------------
# Positive sets
# ---------------------------------------------------------------------------------------------------------------

class CaptionGroups(Dataset):
    """Stage 1 data: one item per image holding all its captions' inputs, a positive set.

    ``text`` is (N * captions_per_image, C), image-major. An item is ``{"text": (captions_per_image, C),
    "label": image index}``.
    """

    def __init__(self, text: torch.Tensor, captions_per_image: int = 5):
        if len(text) == 0 or len(text) % captions_per_image:
            raise ValueError(f"{len(text)} captions are not a positive multiple of {captions_per_image}")
        self.text, self.captions_per_image = text, captions_per_image

    def __len__(self) -> int:
        return len(self.text) // self.captions_per_image

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.captions_per_image
        label = torch.tensor(index)
        return {"text": self.text[start : start + self.captions_per_image].float(), "label": label}


def random_crop_weights(views: int, side: int = 7, min_crop: int = 4,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(views, side * side) averaging weights of random axis-aligned crops of a ``side`` x ``side`` grid.

    Each crop has height and width drawn uniformly in ``min_crop .. side`` and a uniform position; its weights
    are 1 / (h * w) inside, 0 outside, in the row-major order of the flattened grid.
    """
    if not 1 <= min_crop <= side:
        raise ValueError(f"min_crop must be in 1..{side}, got {min_crop}")
    weights = torch.zeros(views, side, side)
    for view in range(views):
        height, width = (int(torch.randint(min_crop, side + 1, (1,), generator=generator)) for _ in range(2))
        top = int(torch.randint(0, side - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, side - width + 1, (1,), generator=generator))
        weights[view, top : top + height, left : left + width] = 1.0 / (height * width)
    return weights.flatten(1)


class RegionCropViews(Dataset):
    """Stage 2 data: ``views`` random crops of each image's cached region grid (N, side * side, C), mean-pooled.

    An item is ``{"image": (views, C) float32, "label": class}`` with the class from ``labels`` (same-class
    images are positives too) or, without labels, the image's own index (views of one image are the only
    positives). Crops are drawn from torch's global generator, which :func:`xmr.train.fit` seeds per epoch.
    """

    def __init__(self, grid: torch.Tensor, views: int = 2, min_crop: int = 4, labels: torch.Tensor | None = None):
        side = int(round(grid.shape[1] ** 0.5))
        if grid.dim() != 3 or side * side != grid.shape[1]:
            raise ValueError(f"expected a (N, side * side, C) region grid, got {tuple(grid.shape)}")
        if labels is not None and labels.shape != grid.shape[:1]:
            raise ValueError(f"labels must have shape ({len(grid)},), got {tuple(labels.shape)}")
        if views < 1:
            raise ValueError(f"views must be positive, got {views}")
        random_crop_weights(1, side, min_crop)  # validates min_crop
        self.grid, self.views, self.min_crop, self.side = grid, views, min_crop, side
        self.labels = labels

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        weights = random_crop_weights(self.views, self.side, self.min_crop)  # (V, R)
        views = weights @ self.grid[index].float()  # (V, C)
        label = self.labels[index] if self.labels is not None else torch.tensor(index)
        return {"image": views, "label": label}


# ---------------------------------------------------------------------------------------------------------------
# Models of the three stages
# ---------------------------------------------------------------------------------------------------------------

class SemanticSpace(nn.Module):
    """Stage 1 or 2: one modality's trainable head on frozen backbone features, into an L2-normalised space.

    ``training_losses`` reads ``batch[modality]`` (B, V, C), V members of each positive set, and
    ``batch["label"]`` (B,); it returns the loss plus two diagnostics (detached): the mean cosine of positive
    pairs and of negative pairs in the batch (both near 1 means the space has collapsed).
    """

    def __init__(self, head: nn.Module, modality: str, loss: nn.Module | None = None):
        super().__init__()
        if modality not in ("text", "image"):
            raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
        self.head, self.modality, self.loss = head, modality, loss

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.head(inputs.float()), dim=-1)  # (B, D)

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.loss is None:
            raise RuntimeError("SemanticSpace was built without a loss; pass loss= to train it")
        inputs = batch[self.modality]  # (B, V, C)
        labels = batch["label"].repeat_interleave(inputs.shape[1])  # (B * V,), item-major like the flattening
        features = self(inputs.flatten(0, 1))  # (B * V, D)
        losses = dict(self.loss(features, labels))
        with torch.no_grad():
            cosine = features @ features.T  # (BV, BV)
            same = labels[:, None] == labels[None, :]
            is_self = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            positive, negative = same & ~is_self, ~same
            losses["positive_cosine"] = cosine[positive].mean() if positive.any() else cosine.new_tensor(0.0)
            losses["negative_cosine"] = cosine[negative].mean() if negative.any() else cosine.new_tensor(0.0)
        return losses


class PretrainedSpace(nn.Module):
    """A frozen backbone's own space: its pooled features, L2-normalised (stages 1-2 skipped; no parameters)."""

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(inputs.float(), dim=-1)


class MappedDualEncoder(nn.Module):
    """Stage 3: frozen image and text spaces and one trainable ``nn.Linear`` from one space into the other.

    ``map_from="image"`` (default) maps image-space features into the text space, ``"text"`` the reverse; the
    mapped side is L2-normalised again, similarities are cosines. It has ``encode_image`` / ``encode_text`` like
    :class:`xmr.encoders.DualEncoder`, so :func:`xmr.train.evaluate_retrieval` evaluates it, and only the
    mapping is trainable: the spaces are frozen and kept in eval mode.
    """

    def __init__(self, image_space: SemanticSpace | nn.Module, text_space: SemanticSpace | nn.Module,
                 mapping: nn.Linear, loss: nn.Module | None = None, map_from: str = "image"):
        super().__init__()
        if map_from not in ("image", "text"):
            raise ValueError(f"map_from must be 'image' or 'text', got {map_from!r}")
        self.image_space, self.text_space, self.mapping = image_space, text_space, mapping
        self.loss, self.map_from = loss, map_from
        self.image_space.requires_grad_(False)
        self.text_space.requires_grad_(False)

    def train(self, mode: bool = True) -> MappedDualEncoder:
        super().train(mode)
        self.image_space.eval()
        self.text_space.eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        features = self.image_space(images)
        return F.normalize(self.mapping(features), dim=-1) if self.map_from == "image" else features

    def encode_text(self, texts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        features = self.text_space(texts)
        return F.normalize(self.mapping(features), dim=-1) if self.map_from == "text" else features

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.loss is None:
            raise RuntimeError("MappedDualEncoder was built without a loss; pass loss= to train it")
        return self.loss(self.encode_image(batch["image"]), self.encode_text(batch["text"]))

    def parameter_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.mapping.parameters())}]


# ---------------------------------------------------------------------------------------------------------------
# Caption-to-caption retrieval
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def caption_retrieval_metrics(features: torch.Tensor, captions_per_image: int = 5, cutoffs=(1, 5, 10),
                              chunk_size: int = 1024) -> dict[str, float]:
    """Each caption queries all the others (cosine); the other captions of its image are the relevant ones.

    ``features`` is (M, D), image-major. Positions are counted pessimistically, like
    :func:`xmr.metrics.retrieval_ranks`: the j-th best relevant caption (1-based j) sits at position
    ``j + #{irrelevant captions with similarity >= its own}``. Returns ``r{K}`` = 100 x the fraction of queries
    with a relevant caption in the top K (the VSE++ "hit" convention), and ``map`` = MAP@all, with
    ``AP = (1 / R) sum_j j / position_j`` over the R = captions_per_image - 1 relevant captions.
    """
    count = len(features)
    if features.dim() != 2 or count == 0 or count % captions_per_image or captions_per_image < 2:
        raise ValueError(f"expected (M, D) features of M = images x {captions_per_image} (>= 2) captions, "
                         f"got {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features hold NaN or infinite values")
    features = F.normalize(features.double() if features.dtype == torch.float64 else features.float(), dim=1)
    relevant_count = captions_per_image - 1
    offsets = torch.arange(captions_per_image, device=features.device)
    first_positions, precisions = [], []
    for start in range(0, count, chunk_size):
        queries = torch.arange(start, min(start + chunk_size, count), device=features.device)  # (c,)
        sims = features[queries] @ features.T  # (c, M)
        members = (queries // captions_per_image)[:, None] * captions_per_image + offsets  # (c, cpi), self included
        others = members[members != queries[:, None]].view(len(queries), relevant_count)  # (c, R)
        relevant = sims.gather(1, others).sort(dim=1, descending=True).values  # (c, R), best first
        sims.scatter_(1, members, -torch.inf)  # leave only the irrelevant captions
        above = torch.stack([(sims >= relevant[:, j : j + 1]).view(torch.uint8).sum(dim=1, dtype=torch.int32)
                             for j in range(relevant_count)], dim=1)  # (c, R); a uint8 sum is faster than bool
        positions = above + torch.arange(1, relevant_count + 1, device=features.device)  # (c, R), 1-based
        first_positions.append(positions[:, 0])
        ranks_among_relevant = torch.arange(1, relevant_count + 1, device=features.device, dtype=torch.float64)
        precisions.append((ranks_among_relevant / positions).mean(dim=1))  # (c,) AP of each query
    first = torch.cat(first_positions)
    metrics = {f"r{k}": 100.0 * float((first <= k).double().mean()) for k in cutoffs}
    metrics["map"] = float(torch.cat(precisions).double().mean())
    return metrics


class CaptionRetrievalValidator:
    """``validate(model) -> caption_retrieval_metrics`` of a text space on held-out captions, for
    :func:`~xmr.train.fit`."""

    def __init__(self, text: torch.Tensor, captions_per_image: int = 5, batch_size: int = 1024):
        self.text, self.captions_per_image, self.batch_size = text, captions_per_image, batch_size

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        features = torch.cat([model(self.text[start : start + self.batch_size].to(device))
                              for start in range(0, len(self.text), self.batch_size)])
        model.train(was_training)
        return caption_retrieval_metrics(features, self.captions_per_image)


# ---------------------------------------------------------------------------------------------------------------
# The three-stage recipe
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class SemanticUnificationSettings:
    """The model side of the three stages (each stage's optimisation is a :class:`xmr.train.TrainConfig`)."""

    text_space_dim: int = 128
    image_space_dim: int = 128
    projection: str = "linear"  # the heads of the spaces: "linear" (as the joint baseline) or "mlp"
    text_temperature: float = 0.1  # SupCon temperature of stage 1 (paper: not given)
    image_temperature: float = 0.2  # SupCon temperature of stage 2 (paper: not given)
    printed_formula: bool = False  # stages 1-2 with Eq. (2)/(4) as printed
    image_views: int = 2  # crops per image in a stage-2 batch
    min_crop: int = 4  # smallest crop side, in regions of the 7 x 7 grid
    mapping_loss: str = "infonce"  # "infonce" (Fig. 4: contrastive) or "distance" (Sec. 3.3 text)
    mapping_temperature: float = 0.07  # for mapping_loss="infonce"
    map_from: str = "image"  # which space the linear layer maps into the other


@dataclass
class StageOutcome:
    training: TrainResult
    trainable_parameters: int
    preparation_time_s: float = 0.0  # work done once before the epochs (stage 3: encoding the frozen spaces)
    selected_by: str | None = None  # the validation metric that chose the epoch; None: the last epoch was kept

    @property
    def training_time_s(self) -> float:
        """Seconds spent in training steps and preparation (per-epoch validation excluded)."""
        return training_time_s(self.training) + self.preparation_time_s


def training_time_s(result: TrainResult) -> float:
    """Seconds in training steps of a :class:`~xmr.train.TrainResult`, without the per-epoch validation."""
    return float(sum(row["train_time_s"] for row in result.history))


@dataclass
class UnificationOutcome:
    model: MappedDualEncoder
    stages: dict[str, StageOutcome]
    test_metrics: dict = field(default_factory=dict)
    per_query: dict = field(default_factory=dict)  # the test ranks the metrics come from

    @property
    def trainable_parameters(self) -> int:
        return sum(stage.trainable_parameters for stage in self.stages.values())

    @property
    def training_time_s(self) -> float:
        return sum(stage.training_time_s for stage in self.stages.values())

    @property
    def wall_time_s(self) -> float:
        return sum(stage.training.wall_time_s for stage in self.stages.values())


def build_space(settings: SemanticUnificationSettings, modality: str) -> SemanticSpace:
    """An untrained stage-1 (text) or stage-2 (image) space with its loss."""
    if modality == "text":
        in_dim, out_dim, temperature = TEXT_FEATURE_DIM, settings.text_space_dim, settings.text_temperature
    else:
        in_dim, out_dim, temperature = IMAGE_FEATURE_DIM, settings.image_space_dim, settings.image_temperature
    loss = SemanticContrastiveLoss(temperature, printed_formula=settings.printed_formula)
    return SemanticSpace(ProjectionHead(in_dim, out_dim, settings.projection), modality, loss)


def train_text_space(settings: SemanticUnificationSettings, config: TrainConfig, text: torch.Tensor,
                     captions_per_image: int = 5, validation_text: torch.Tensor | None = None,
                     ) -> tuple[SemanticSpace, StageOutcome]:
    """Stage 1: the text head with captions of one image as positives; with ``validation_text`` the epoch with
    the best caption-to-caption MAP on it is kept (``config.select_by`` is replaced by ``"map"``), else the last."""
    torch.manual_seed(config.seed)
    space = build_space(settings, "text")
    validate = CaptionRetrievalValidator(validation_text, captions_per_image) if validation_text is not None else None
    config = dataclasses.replace(config, select_by="map" if validate is not None else None)
    training = fit(space, CaptionGroups(text, captions_per_image), config, validate=validate)
    return space.eval(), StageOutcome(training, count_trainable_parameters(space), selected_by=config.select_by)


def train_image_space(settings: SemanticUnificationSettings, config: TrainConfig, grid: torch.Tensor,
                      labels: torch.Tensor | None = None) -> tuple[SemanticSpace, StageOutcome]:
    """Stage 2: the image head with crops of one image (and same-class images) as positives; last epoch kept."""
    torch.manual_seed(config.seed + 1)  # another draw of the initial head than stage 1's
    space = build_space(settings, "image")
    views = RegionCropViews(grid, settings.image_views, settings.min_crop, labels)
    training = fit(space, views, dataclasses.replace(config, select_by=None))
    return space.eval(), StageOutcome(training, count_trainable_parameters(space))


def train_mapping(image_space: nn.Module, text_space: nn.Module, settings: SemanticUnificationSettings,
                  config: TrainConfig, train: CaptionInputs, validation: CaptionInputs | None = None,
                  caption_choice: str = "random") -> tuple[MappedDualEncoder, StageOutcome]:
    """Stage 3, retrainable on its own: a fresh linear map between two frozen spaces (its shape read from their
    outputs), trained on image-caption pairs (one random caption per image per epoch by default) and selected
    by validation Rsum. Only ``settings``' stage-3 fields are used.

    Because the spaces are frozen, their features are computed once (``preparation_time_s``, counted in the
    stage's training time) and the epochs train the mapping on them; the returned model holds the spaces and
    the trained mapping, and reads backbone features like any other.
    """
    started = time.perf_counter()
    train_spaces = _encode_spaces(image_space, text_space, train, config)
    validation_spaces = _encode_spaces(image_space, text_space, validation, config) if validation is not None else None
    preparation_time_s = time.perf_counter() - started
    image_dim, text_dim = train_spaces.image.shape[1], train_spaces.text.shape[1]
    torch.manual_seed(config.seed + 2)
    mapping = nn.Linear(image_dim, text_dim) if settings.map_from == "image" else nn.Linear(text_dim, image_dim)
    loss = make_mapping_loss(settings.mapping_loss, settings.mapping_temperature)
    on_features = MappedDualEncoder(PretrainedSpace(), PretrainedSpace(), mapping, loss, settings.map_from)
    pairs = PairedFeatures(train_spaces.image, train_spaces.text, None, train.captions_per_image,
                           caption_choice=caption_choice, seed=config.seed)
    validate = validation_spaces.validator() if validation_spaces is not None else None
    config = config if validate is not None else dataclasses.replace(config, select_by=None)
    training = fit(on_features, pairs, config, validate=validate)
    model = MappedDualEncoder(image_space, text_space, mapping, loss, settings.map_from).to(config.resolved_device())
    return model.eval(), StageOutcome(training, count_trainable_parameters(model), preparation_time_s,
                                      config.select_by)


@torch.no_grad()
def _encode_spaces(image_space: nn.Module, text_space: nn.Module, inputs: CaptionInputs,
                   config: TrainConfig) -> CaptionInputs:
    """The frozen spaces' features of one split (on the CPU), for training a mapping on them."""
    device = config.resolved_device()
    image_space.to(device).eval()
    text_space.to(device).eval()
    image = encode(image_space, inputs.image, None, device=device).cpu()  # (N, D_image)
    text = encode(text_space, inputs.text, inputs.text_mask, device=device).cpu()  # (5N, D_text)
    return CaptionInputs(image, text, None, inputs.captions_per_image)


def run_semantic_unification(settings: SemanticUnificationSettings, text_config: TrainConfig,
                             image_config: TrainConfig, mapping_config: TrainConfig, train: CaptionInputs,
                             train_grid: torch.Tensor, validation: CaptionInputs, test: CaptionInputs,
                             image_labels: torch.Tensor | None = None) -> UnificationOutcome:
    """The three stages in order (text space, image space, mapping), then the test metrics of the result.

    ``train`` / ``validation`` / ``test`` hold pooled backbone features (:func:`xmr.experiment.load_caption_inputs`
    with tops 0); ``train_grid`` is the training images' (N, 49, 1280) region grid for the stage-2 crops.
    """
    text_space, text_stage = train_text_space(settings, text_config, train.text, train.captions_per_image,
                                              validation.text)
    image_space, image_stage = train_image_space(settings, image_config, train_grid, image_labels)
    model, mapping_stage = train_mapping(image_space, text_space, settings, mapping_config, train, validation)
    test_metrics, per_query = evaluate_retrieval_per_query(model, test.image, test.text, test.text_mask,
                                                           test.captions_per_image)
    stages = {"text_space": text_stage, "image_space": image_stage, "mapping": mapping_stage}
    return UnificationOutcome(model, stages, test_metrics, per_query)


def map_spaces(image_space: nn.Module, text_space: nn.Module, settings: SemanticUnificationSettings,
               config: TrainConfig, train: CaptionInputs, validation: CaptionInputs,
               test: CaptionInputs) -> UnificationOutcome:
    """Stage 3 alone between any two frozen spaces (e.g. a trained model's, with another ``mapping_loss``, or the
    backbones' own, :class:`PretrainedSpace`), evaluated on ``test``; the spaces are shared, not copied."""
    model, stage = train_mapping(image_space, text_space, settings, config, train, validation)
    test_metrics, per_query = evaluate_retrieval_per_query(model, test.image, test.text, test.text_mask,
                                                           test.captions_per_image)
    return UnificationOutcome(model, {"mapping": stage}, test_metrics, per_query)


def record_unification(results_dir: str | Path, run_name: str, outcome: UnificationOutcome,
                       settings: SemanticUnificationSettings, configs: dict[str, TrainConfig],
                       dataset: str = "flickr8k", extra_parameters: dict | None = None) -> Path:
    """Write the result file of one :func:`run_semantic_unification` run: test metrics, and per stage its
    trainable parameters, training time and history."""
    mapping = outcome.model.mapping
    parameters = {**dataclasses.asdict(settings), **{f"{name}_config": dataclasses.asdict(config)
                                                     for name, config in configs.items()},
                  "mapping_in_features": mapping.in_features, "mapping_out_features": mapping.out_features,
                  **(extra_parameters or {})}
    history = [{"stage": name, **row} for name, stage in outcome.stages.items() for row in stage.training.history]
    stages = {name: {"trainable_parameters": stage.trainable_parameters, "training_time_s": stage.training_time_s,
                     "selected_by": stage.selected_by,
                     "best_metrics": stage.training.best_metrics}
              for name, stage in outcome.stages.items()}
    training = staged_training({name: stage.training.record() for name, stage in outcome.stages.items()})
    device = next(iter(configs.values())).resolved_device()
    return write_result(results_dir, PAPER_ID, run_name, parameters=parameters, dataset=dataset, split="test",
                        metrics=dict(outcome.test_metrics), training=training, per_query=outcome.per_query,
                        history=history, device=device,
                        extra={"trainable_parameters": outcome.trainable_parameters,
                               "training_time_s": outcome.training_time_s, "stages": stages})


def run_costs(record: dict) -> dict[str, float]:
    """Trainable parameters, training time (validation excluded) and wall time of a result file written by
    :func:`record_unification` or :func:`xmr.experiment.record_outcome`, with the mapping stage's share."""
    if "stages" in record:
        mapping = record["stages"].get("mapping", {})
        return {"trainable_parameters": record["trainable_parameters"], "training_time_s": record["training_time_s"],
                "wall_time_s": record["training"]["wall_time_s"],
                "mapping_parameters": mapping.get("trainable_parameters", 0),
                "mapping_time_s": mapping.get("training_time_s", 0.0)}
    return {"trainable_parameters": record["trainable_parameters"],
            "training_time_s": float(sum(row["train_time_s"] for row in record["history"])),
            "wall_time_s": record["training"]["wall_time_s"], "mapping_parameters": 0, "mapping_time_s": 0.0}


def load_region_grid(split: str, num_images: int | None = None, root=None,
                     settings: ExtractionSettings | None = None) -> torch.Tensor:
    """The cached (N, 49, 1280) float16 EfficientNet-Lite0 region grid of a Flickr8k split (stage-2 crops)."""
    data = load_flickr8k(split, root=root)
    if num_images is not None:
        data = data.subset(min(num_images, len(data)))
    return image_features(data, ImageBackbone(trainable_top=0), settings)["grid"]
