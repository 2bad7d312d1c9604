"""A dual-encoder experiment on Flickr8k: cached inputs -> model with a named loss -> training -> test metrics.

This is the recipe the loss-comparison papers share (timofeev2022; the joint baselines of icone2024 and
shi2024): pick what the backbones leave trainable, a projection, an embedding size and a loss, train with
:func:`xmr.train.fit`, select by validation Rsum and evaluate on the test split; :func:`xmr.outcome.record`
writes the result file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import CaptionInputs, PairedFeatures
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
)
from .losses import make_loss
from .outcome import Outcome
from .train import RetrievalValidator, TrainConfig, evaluate_retrieval_per_query, fit


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


def run_dual_encoder(settings: DualEncoderSettings, config: TrainConfig, train: CaptionInputs,
                     validation: CaptionInputs, test: CaptionInputs,
                     checkpoint_dir: str | Path | None = None,
                     loss: torch.nn.Module | None = None, start: torch.nn.Module | None = None) -> Outcome:
    """Train a dual encoder (one random caption per image per epoch) until its validation Rsum stops improving
    or its budget ends, restore the best validation epoch, and evaluate it on ``test``.

    ``start``: a trained dual encoder to start from (its heads and any tops it trained; tops it kept frozen start
    pretrained, i.e. from what it computed): fine-tuning after a linear probe. None: fresh heads."""
    torch.manual_seed(config.seed)
    model = build_dual_encoder(settings, loss)
    if start is not None:
        missing, unexpected = model.load_state_dict(start.state_dict(), strict=False)
        untrained = [key for key in missing if ".upper." not in key]  # only pretrained tops may be missing
        if unexpected or untrained:
            raise ValueError(f"start does not fit these settings: unexpected {unexpected}, missing {untrained}")
    pairs = PairedFeatures(train.image, train.text, train.text_mask, train.captions_per_image,
                           caption_choice="random", seed=config.seed)
    training = fit(model, pairs, config, validate=RetrievalValidator.for_split(validation),
                   checkpoint_dir=checkpoint_dir)
    test_metrics, per_query = evaluate_retrieval_per_query(model, test)
    return Outcome(model, {**dataclasses.asdict(settings), **dataclasses.asdict(config)}, {"train": training},
                   test_metrics, per_query, count_trainable_parameters(model), str(config.resolved_device()))
