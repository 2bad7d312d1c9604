"""A dual-encoder experiment on Flickr8k: cached inputs -> model with a named loss -> training -> test metrics.

This is the recipe the loss-comparison papers share (timofeev2022; the joint baselines of icone2024 and
shi2024): pick what the backbones leave trainable, a projection, an embedding size and a loss, train with
:func:`xmr.train.fit`, select by validation Rsum, evaluate on the test split, and write a result file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import PairedFeatures, load_flickr8k
from .encoders import (
    GPO,
    IMAGE_FEATURE_DIM,
    TEXT_FEATURE_DIM,
    DualEncoder,
    ImageBackbone,
    ProjectionHead,
    TextBackbone,
    Tower,
    count_trainable_parameters,
    sort_regions,
)
from .features import ExtractionSettings, image_features, text_features
from .losses import make_loss
from .results import write_result
from .train import RetrievalValidator, TrainConfig, TrainResult, evaluate_retrieval_per_query, fit


@dataclass
class CaptionInputs:
    """What the towers read for one split: image inputs (N, ...), caption inputs (5N, ...), optional mask."""

    image: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor | None = None
    captions_per_image: int = 5

    def validator(self) -> RetrievalValidator:
        return RetrievalValidator(self.image, self.text, self.text_mask, self.captions_per_image)

    def sorted_regions(self, chunk: int = 512) -> "CaptionInputs":
        """A copy whose region/token features are sorted per dimension once (:func:`xmr.encoders.sort_regions`;
        same dtype). A GPO gives the same output on them and skips its per-batch sort. Only for the frozen
        backbones' region/token features: activations below a trainable top must stay as they are."""
        def sort_all(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            parts = [sort_regions(features[start : start + chunk].float(),
                                  None if mask is None else mask[start : start + chunk])[0].to(features.dtype)
                     for start in range(0, len(features), chunk)]
            return torch.cat(parts)

        if self.image.dim() != 3 or self.text.dim() != 3:
            raise ValueError("sorted_regions needs region/token inputs: load_caption_inputs(..., regions=True)")
        return dataclasses.replace(self, image=sort_all(self.image, None), text=sort_all(self.text, self.text_mask))


def load_caption_inputs(split: str, image_top: int = 0, text_top: int = 0, num_images: int | None = None,
                        root=None, settings: ExtractionSettings | None = None, regions: bool = False) -> CaptionInputs:
    """Cached Flickr8k inputs for ``split``, per modality: the activations below the ``image_top`` /
    ``text_top`` trainable stages when those are > 0; else the frozen backbone's pooled features, or with
    ``regions=True`` its region/token features (the 7 x 7 grid (N, 49, 1280), the tokens (5N, L, 384) with their
    mask; float16). ``num_images`` keeps the first images (smoke runs)."""
    data = load_flickr8k(split, root=root)
    if num_images is not None:
        data = data.subset(min(num_images, len(data)))
    images = image_features(data, ImageBackbone(trainable_top=image_top), settings)
    texts = text_features(data, TextBackbone(trainable_top=text_top), settings)
    image = images["lower"] if image_top else images["grid"] if regions else images["pooled"]
    if text_top or regions:
        return CaptionInputs(image, texts["lower"] if text_top else texts["tokens"], texts["mask"],
                             data.captions_per_image)
    return CaptionInputs(image, texts["pooled"], None, data.captions_per_image)


@dataclass
class DualEncoderSettings:
    """The model side of an experiment (the optimisation side is a :class:`xmr.train.TrainConfig`)."""

    loss: str = "infonce"
    loss_options: dict = field(default_factory=dict)
    embed_dim: int = 128
    projection: str = "linear"
    pooling: str = "mean"  # of region/token inputs: "mean" (masked) or "gpo" (VSE-infinity's learned pooling)
    image_top: int = 0  # trainable top stages of EfficientNet-Lite0 (0 = frozen)
    text_top: int = 0  # trainable top layers of all-MiniLM-L6-v2 (0 = frozen)


def build_dual_encoder(settings: DualEncoderSettings, loss: torch.nn.Module | None = None) -> DualEncoder:
    """The model of ``settings``; ``loss`` replaces the named loss (e.g. a flagged literal variant)."""
    if settings.pooling not in ("mean", "gpo"):
        raise ValueError(f"pooling must be 'mean' or 'gpo', got {settings.pooling!r}")
    image_upper = ImageBackbone(trainable_top=settings.image_top) if settings.image_top else None
    text_upper = TextBackbone(trainable_top=settings.text_top) if settings.text_top else None

    def pooling():  # a GPO pools region/token inputs (load_caption_inputs(..., regions=True)); pooled ones skip it
        return GPO() if settings.pooling == "gpo" else None

    return DualEncoder(
        Tower(ProjectionHead(IMAGE_FEATURE_DIM, settings.embed_dim, settings.projection), image_upper, pooling()),
        Tower(ProjectionHead(TEXT_FEATURE_DIM, settings.embed_dim, settings.projection), text_upper, pooling()),
        loss if loss is not None else make_loss(settings.loss, **settings.loss_options),
    )


@torch.no_grad()
def encode_new_captions(model: DualEncoder, settings: DualEncoderSettings, captions: list[str]) -> torch.Tensor:
    """Joint-space embeddings (M, D) of captions that are not in the dataset (free-text queries)."""
    backbone = TextBackbone(trainable_top=settings.text_top)
    tokens = backbone.tokenize(captions)
    model.eval()
    if settings.text_top == 0:
        return model.encode_text(backbone(**tokens)["pooled"].to(_device(model)))
    lower = backbone.forward_lower(**tokens)
    return model.encode_text(lower.to(_device(model)), tokens["attention_mask"].to(_device(model)))


@torch.no_grad()
def encode_new_images(model: DualEncoder, settings: DualEncoderSettings, paths: list) -> torch.Tensor:
    """Joint-space embeddings (M, D) of image files that are not in the evaluated split."""
    from .data import load_image

    backbone = ImageBackbone(trainable_top=settings.image_top)
    pixels = backbone.preprocess([load_image(path) for path in paths])
    model.eval()
    if settings.image_top == 0:
        return model.encode_image(backbone(pixels)["pooled"].to(_device(model)))
    return model.encode_image(backbone.forward_lower(pixels).to(_device(model)))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class ExperimentOutcome:
    model: DualEncoder
    training: TrainResult
    test_metrics: dict
    per_query: dict  # the test ranks the metrics come from (xmr.metrics.retrieval_evaluation)
    trainable_parameters: int


def run_dual_encoder(settings: DualEncoderSettings, config: TrainConfig, train: CaptionInputs,
                     validation: CaptionInputs, test: CaptionInputs,
                     checkpoint_dir: str | Path | None = None,
                     loss: torch.nn.Module | None = None) -> ExperimentOutcome:
    """Train a dual encoder (one random caption per image per epoch) until its validation Rsum stops improving
    or its budget ends, restore the best validation epoch, and evaluate it on ``test``."""
    torch.manual_seed(config.seed)
    model = build_dual_encoder(settings, loss)
    pairs = PairedFeatures(train.image, train.text, train.text_mask, train.captions_per_image,
                           caption_choice="random", seed=config.seed)
    training = fit(model, pairs, config, validate=validation.validator(), checkpoint_dir=checkpoint_dir)
    test_metrics, per_query = evaluate_retrieval_per_query(model, test.image, test.text, test.text_mask,
                                                           test.captions_per_image)
    return ExperimentOutcome(model, training, test_metrics, per_query, count_trainable_parameters(model))


def record_outcome(results_dir: str | Path, paper_id: str, run_name: str, outcome: ExperimentOutcome,
                   settings: DualEncoderSettings, config: TrainConfig, dataset: str = "flickr8k",
                   extra_parameters: dict | None = None) -> Path:
    """Write the result file of one :func:`run_dual_encoder` run."""
    parameters = {**dataclasses.asdict(settings), **dataclasses.asdict(config), **(extra_parameters or {})}
    return write_result(
        results_dir, paper_id, run_name, parameters=parameters, dataset=dataset, split="test",
        metrics={**outcome.test_metrics, **{f"val_{k}": v for k, v in outcome.training.best_metrics.items()}},
        training=outcome.training.record(), per_query=outcome.per_query, history=outcome.training.history,
        device=config.resolved_device(),
        extra={"trainable_parameters": outcome.trainable_parameters,
               "pairs_per_second": outcome.training.pairs_per_second},
    )
