"""Intra-modal semantic unification, then a cross-modal linear mapping (shi2024).

Shi & Li, "Rethinking Semantic Contrastive Learning and Content Fusion in Multimodal Retrieval". No public code
exists; ``../shared/papers/METHOD_NOTES.md`` records the reading followed here. Equation numbers are the paper's.

The paper trains three things one after the other, each with a single responsibility (Sec. 3, Fig. 1):

1. **Text semantic space** (Sec. 3.1, Eqs. 1-2): texts with the same semantics are a positive set, the others
   negatives; the text encoder is trained so that a positive set clusters.
2. **Image semantic space** (Sec. 3.2, Eqs. 3-4): the same for images "of the same type".
3. **Semantic shared space** (Sec. 3.3): with both spaces fixed, "a linear layer" reduces "the distance between
   all feature pairs"; it can be retrained at any time on its own, with few parameters.

**Eqs. (2)/(4) cannot work as printed**: they have no negatives, cost the same at cosine 1 and -1, and are
minimised by every feature collapsing onto one point (:func:`xmr.losses.printed_term_of_cosine`). The faithful
reading, used by default, is supervised contrastive learning within the modality
(:class:`xmr.losses.SupervisedContrastiveLoss`); ``printed_formula=True`` runs Eq. (2) as printed.

What is a positive set here (:mod:`xmr.data.views`): for text, the captions of one image
(:class:`~xmr.data.views.CaptionGroups`); for images, views of one image and, where classes exist, images of one
class (:class:`~xmr.data.views.RegionCropViews`). The project trains on cached backbone features, so a "view" is
a random crop of the backbone's 7 x 7 region grid, mean-pooled. Flickr8k has no classes;
:func:`caption_pseudo_classes` makes some (k-means on each image's mean caption feature) so that stage 2 can have
"images of the same type" as positives. The text space is selected by caption-to-caption MAP
(:func:`xmr.metrics.caption_retrieval_metrics`, :class:`CaptionRetrievalValidator`).

At the project's CPU scale the "encoders" being trained are the projection heads on frozen EfficientNet-Lite0
and all-MiniLM-L6-v2 features: the same heads as the joint baseline (:func:`xmr.experiment.run_dual_encoder`),
so the comparison isolates the training scheme. Stage 3 (:class:`MappedDualEncoder`) maps the image space into
the text space with one ``nn.Linear`` (``map_from="text"`` maps the other way) and trains only that layer, on
the frozen spaces' features encoded once (:func:`train_mapping`; :func:`map_spaces` maps any two frozen spaces,
e.g. the backbones' own, :class:`PretrainedSpace`). Its objective is read two ways: Fig. 4 is captioned
"contrastive learning with the same feature semantics", so the default is InfoNCE on the pairs (the joint
baseline's loss too); the text of Sec. 3.3, "reducing the distance between all feature pairs", is
:class:`PairDistanceLoss` (``mapping_loss="distance"``). :func:`training_costs` gives the costs Sec. 3.3's
claims are about, :func:`time_to_dev_score` the time a training takes to reach a given dev score.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..cluster import kmeans
from ..data import CaptionInputs, PairedFeatures
from ..data.views import CaptionGroups, RegionCropViews
from ..encoders import IMAGE_FEATURE_DIM, TEXT_FEATURE_DIM, ProjectionHead, count_trainable_parameters
from ..losses import InfoNCELoss, SupervisedContrastiveLoss
from ..metrics import caption_retrieval_metrics
from ..outcome import Outcome
from ..train import (
    HeldOutLossValidator,
    RetrievalValidator,
    TrainConfig,
    TrainResult,
    encode,
    evaluate_retrieval_per_query,
    fit,
)

PAPER_ID = "shi2024"
STAGES = ("text_space", "image_space", "mapping")


# ---------------------------------------------------------------------------------------------------------------
# Stage 3 losses
# ---------------------------------------------------------------------------------------------------------------

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


class CaptionRetrievalValidator:
    """``validate(model)``: :func:`xmr.metrics.caption_retrieval_metrics` of a text space on held-out captions, the
    validation of stage 1 in :func:`~xmr.train.fit`."""

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
    """One stage's training, as :func:`train_text_space`, :func:`train_image_space` and :func:`train_mapping`
    return it."""

    training: TrainResult
    trainable_parameters: int
    preparation_time_s: float = 0.0  # work done once before the epochs (stage 3: encoding the frozen spaces)
    config: TrainConfig | None = None  # the config the stage trained with (its select_by as used)

    @property
    def selected_by(self) -> str | None:
        """Which validation metric chose the epoch (None when the last epoch was kept)."""
        return None if self.config is None else self.config.select_by

    def summary(self) -> dict:
        """The stage's entry in a result file's ``stages``; its training time counts steps and preparation."""
        steps = sum(row["train_time_s"] for row in self.training.history)
        return {"trainable_parameters": self.trainable_parameters,
                "training_time_s": float(steps) + self.preparation_time_s, "selected_by": self.selected_by,
                "best_metrics": self.training.best_metrics}


def build_space(settings: SemanticUnificationSettings, modality: str) -> SemanticSpace:
    """An untrained stage-1 (text) or stage-2 (image) space with its loss."""
    if modality == "text":
        in_dim, out_dim, temperature = TEXT_FEATURE_DIM, settings.text_space_dim, settings.text_temperature
    else:
        in_dim, out_dim, temperature = IMAGE_FEATURE_DIM, settings.image_space_dim, settings.image_temperature
    loss = SupervisedContrastiveLoss(temperature, printed_formula=settings.printed_formula)
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
    return space.eval(), StageOutcome(training, count_trainable_parameters(space), config=config)


def train_image_space(settings: SemanticUnificationSettings, config: TrainConfig, grid: torch.Tensor,
                      labels: torch.Tensor | None = None, validation_grid: torch.Tensor | None = None,
                      ) -> tuple[SemanticSpace, StageOutcome]:
    """Stage 2: the image head with crops of one image (and same-class images, ``labels`` (N,), e.g.
    :func:`caption_pseudo_classes`) as positives. With ``validation_grid`` (held-out images' region grid) and no
    ``labels``, the epoch with the lowest instance-discrimination loss on fixed crops of those images is kept and a
    plateau stops the stage (``config.select_by`` becomes ``"loss"``, minimised); otherwise the last epoch (held-out
    images have no classes to validate a class objective on)."""
    torch.manual_seed(config.seed + 1)  # another draw of the initial head than stage 1's
    space = build_space(settings, "image")
    views = RegionCropViews(grid, settings.image_views, settings.min_crop, labels)
    validate = None
    if validation_grid is not None and labels is None:
        held_out = RegionCropViews(validation_grid, settings.image_views, settings.min_crop)
        validate = HeldOutLossValidator(held_out, config.batch_size, seed=config.seed)
    config = dataclasses.replace(config, select_by="loss" if validate is not None else None, select_mode="min")
    training = fit(space, views, config, validate=validate)
    return space.eval(), StageOutcome(training, count_trainable_parameters(space), config=config)


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
    validate = RetrievalValidator.for_split(validation_spaces) if validation_spaces is not None else None
    config = config if validate is not None else dataclasses.replace(config, select_by=None)
    training = fit(on_features, pairs, config, validate=validate)
    model = MappedDualEncoder(image_space, text_space, mapping, loss, settings.map_from).to(config.resolved_device())
    return model.eval(), StageOutcome(training, count_trainable_parameters(model), preparation_time_s, config)


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


def _unification_outcome(model: MappedDualEncoder, stages: dict[str, StageOutcome],
                         settings: SemanticUnificationSettings, test: CaptionInputs) -> Outcome:
    """The :class:`~xmr.outcome.Outcome` of trained stages ending with the mapping, evaluated on ``test``; the
    parameters record each stage's config as it trained (``select_by`` included)."""
    test_metrics, per_query = evaluate_retrieval_per_query(model, test)
    parameters = {**dataclasses.asdict(settings),
                  **{f"{name}_config": dataclasses.asdict(stage.config) for name, stage in stages.items()},
                  "mapping_in_features": model.mapping.in_features, "mapping_out_features": model.mapping.out_features}
    mapping = stages["mapping"]
    return Outcome(model, parameters, {name: stage.training for name, stage in stages.items()}, test_metrics,
                   per_query, sum(stage.trainable_parameters for stage in stages.values()),
                   str(mapping.config.resolved_device()), preparation_time_s=mapping.preparation_time_s,
                   extra={"stages": {name: stage.summary() for name, stage in stages.items()}})


def run_semantic_unification(settings: SemanticUnificationSettings, text_config: TrainConfig,
                             image_config: TrainConfig, mapping_config: TrainConfig, train: CaptionInputs,
                             train_grid: torch.Tensor, validation: CaptionInputs, test: CaptionInputs,
                             image_labels: torch.Tensor | None = None,
                             text_space: tuple[SemanticSpace, StageOutcome] | None = None,
                             image_space: tuple[SemanticSpace, StageOutcome] | None = None,
                             validation_grid: torch.Tensor | None = None) -> Outcome:
    """The three stages in order (text space, image space, mapping), then the test metrics of the result.

    ``train`` / ``validation`` / ``test`` hold pooled backbone features (:func:`xmr.features.load_caption_inputs`
    with tops 0); ``train_grid`` is the training images' (N, 49, 1280) region grid for the stage-2 crops
    (:func:`xmr.features.load_region_grid`), ``image_labels`` (N,) optional classes of those images (stage-2
    positives), ``validation_grid`` the dev images' grid that validates stage 2 (:func:`train_image_space`).
    ``text_space`` / ``image_space`` reuse a trained stage 1 / 2 (:func:`trained_space` of another
    run) instead of training it; a reused stage is recorded as it trained. The outcome's ``extra["stages"]``
    holds each stage's :meth:`StageOutcome.summary`, its ``preparation_time_s`` the mapping's encoding of the
    frozen spaces.
    """
    if text_space is None:
        text_space = train_text_space(settings, text_config, train.text, train.captions_per_image, validation.text)
    text_space, text_stage = text_space
    if image_space is None:
        image_space = train_image_space(settings, image_config, train_grid, image_labels, validation_grid)
    image_space, image_stage = image_space
    model, mapping_stage = train_mapping(image_space, text_space, settings, mapping_config, train, validation)
    stages = {"text_space": text_stage, "image_space": image_stage, "mapping": mapping_stage}
    return _unification_outcome(model, stages, settings, test)


def trained_space(outcome: Outcome, stage: str) -> tuple[SemanticSpace, StageOutcome]:
    """Stage ``"text_space"`` or ``"image_space"`` of a :func:`run_semantic_unification` outcome, for
    ``text_space=`` / ``image_space=`` of another run."""
    if stage not in ("text_space", "image_space"):
        raise ValueError(f"stage must be 'text_space' or 'image_space', got {stage!r}")
    config = TrainConfig(**outcome.parameters[f"{stage}_config"])
    trained = StageOutcome(outcome.stages[stage], outcome.extra["stages"][stage]["trainable_parameters"], config=config)
    return getattr(outcome.model, stage), trained


def map_spaces(image_space: nn.Module, text_space: nn.Module, settings: SemanticUnificationSettings,
               config: TrainConfig, train: CaptionInputs, validation: CaptionInputs, test: CaptionInputs) -> Outcome:
    """Stage 3 alone between any two frozen spaces (e.g. a trained model's, with another ``mapping_loss``, or the
    backbones' own, :class:`PretrainedSpace`), evaluated on ``test``; the spaces are shared, not copied."""
    model, stage = train_mapping(image_space, text_space, settings, config, train, validation)
    return _unification_outcome(model, {"mapping": stage}, settings, test)


def time_to_best_s(result: TrainResult) -> float:
    """Seconds in training steps up to the kept epoch (the last one when no validation chose it)."""
    kept = result.best_epoch or result.epochs_run
    return float(sum(row["train_time_s"] for row in result.history[:kept]))


def time_to_dev_score(result: TrainResult, target: float, metric: str = "rsum") -> tuple[float, int] | None:
    """``(seconds, epoch)``: training-step seconds up to the end of the first epoch whose validation ``metric``
    reaches ``target`` (validation excluded), and that epoch; None when no epoch reaches it."""
    elapsed = 0.0
    for row in result.history:
        elapsed += row["train_time_s"]
        if row.get(f"val_{metric}", -float("inf")) >= target:
            return float(elapsed), int(row["epoch"])
    return None


@torch.no_grad()
def caption_pseudo_classes(text: torch.Tensor, captions_per_image: int, num_classes: int,
                           seed: int = 0) -> torch.Tensor:
    """(N,) pseudo-classes of N images: spherical k-means (:func:`xmr.cluster.kmeans`) on each image's mean
    caption feature (``text`` (N * captions_per_image, C), image-major), so that images whose captions say
    similar things share a class: stage 2's "images of the same type" where a dataset has no classes."""
    if len(text) % captions_per_image:
        raise ValueError(f"{len(text)} captions are not {captions_per_image} per image")
    means = F.normalize(text.float(), dim=-1).reshape(-1, captions_per_image, text.shape[-1]).mean(dim=1)  # (N, C)
    return kmeans(means, num_classes, metric="cosine", seed=seed).labels.cpu()


def time_to_quality(outcome: Outcome, target: float, metric: str = "rsum") -> dict[str, float] | None:
    """Costs of reaching a fixed dev score, as :func:`training_costs` names them: ``time_to_dev_<metric>_s``,
    the training-step seconds until the last (cross-modal) stage first validates at ``target`` or above, earlier
    stages counted in full and preparation included; ``retrain_time_to_dev_<metric>_s``, the same for the
    cross-modal part alone; ``epochs_to_dev_<metric>``, that stage's epochs. None when no epoch reaches it."""
    reached = time_to_dev_score(outcome.training, target, metric)
    if reached is None:
        return None
    seconds, epoch = reached
    earlier = sum(row["train_time_s"] for result in list(outcome.stages.values())[:-1] for row in result.history)
    retrain = seconds + outcome.preparation_time_s
    return {f"time_to_dev_{metric}_s": float(earlier) + retrain, f"retrain_time_to_dev_{metric}_s": retrain,
            f"epochs_to_dev_{metric}": epoch}


def training_costs(outcome: Outcome) -> dict[str, float]:
    """What Sec. 3.3's claims compare: trainable parameters and training time (steps and preparation, validation
    excluded) to the end and to the kept epochs (``time_to_best_s``), in all and for retraining the cross-modal
    part alone (``retrain_*``): the mapping stage of :func:`run_semantic_unification` or :func:`map_spaces`,
    everything of any other run (e.g. :func:`xmr.experiment.run_dual_encoder`'s joint training)."""
    to_best = sum(time_to_best_s(result) for result in outcome.stages.values()) + outcome.preparation_time_s
    costs = {"trainable_parameters": outcome.trainable_parameters, "training_time_s": outcome.training_time_s,
             "time_to_best_s": to_best}
    if "mapping" not in outcome.stages:
        return {**costs, "retrain_parameters": costs["trainable_parameters"],
                "retrain_time_s": costs["training_time_s"], "retrain_time_to_best_s": to_best}
    mapping = outcome.extra["stages"]["mapping"]
    return {**costs, "retrain_parameters": mapping["trainable_parameters"],
            "retrain_time_s": mapping["training_time_s"],
            "retrain_time_to_best_s": time_to_best_s(outcome.stages["mapping"]) + outcome.preparation_time_s}
