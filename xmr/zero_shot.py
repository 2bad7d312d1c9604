"""Zero-shot image-caption retrieval with pretrained CLIP-family models from a local checkpoint folder.

shi2024's Tables 1-2 evaluate ALIGN, AltCLIP, CLIP and GroupViT without training. This module runs that
evaluation through ``transformers`` (:data:`ZERO_SHOT_MODELS`): a checkpoint folder (``save_pretrained`` of the
model *and* of its processor, e.g. a downloaded Hugging Face snapshot) is loaded offline, every image and
caption is embedded with the model's own ``get_image_features`` / ``get_text_features`` (its projection
included), and the cosine similarity matrix is scored with the project's protocol
(:func:`xmr.metrics.retrieval_metrics`). Cosine similarity is what each model's own contrastive logits use, up
to its scale (CLIP's ``logit_scale``, ALIGN's ``temperature``), and the scale does not change a ranking.

The weights of these models cannot be downloaded here; the code is tested on tiny randomly initialised
configurations and token-id tensors (``tests/test_zero_shot.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .metrics import retrieval_metrics

#: model_type in the checkpoint's config.json -> the transformers class that loads it.
ZERO_SHOT_MODELS = {"clip": "CLIPModel", "align": "AlignModel", "altclip": "AltCLIPModel",
                    "groupvit": "GroupViTModel"}


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4.x) or an output whose ``pooler_output`` it is (5.x)."""
    return output if torch.is_tensor(output) else output.pooler_output


class ZeroShotEncoder(nn.Module):
    """A CLIP-family model seen as two encoders into its joint space, L2-normalised (frozen, eval mode)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in ZERO_SHOT_MODELS:
            raise ValueError(f"model type {model_type!r} is not a supported zero-shot model; supported: "
                             f"{sorted(ZERO_SHOT_MODELS)}")
        self.model, self.model_type = model.eval().requires_grad_(False), model_type
        self.eval()

    def train(self, mode: bool = True) -> ZeroShotEncoder:
        return super().train(False)  # zero-shot: dropout stays off whatever the caller asks

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) token ids -> (B, D) unit-norm text embeddings."""
        return F.normalize(_features(self.model.get_text_features(input_ids=input_ids,
                                                                  attention_mask=attention_mask)).float(), dim=-1)

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels, as the model's image processor prepares them -> (B, D) unit-norm embeddings."""
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixel_values)).float(), dim=-1)


def load_zero_shot_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(ZeroShotEncoder, processor)`` from a local folder holding a supported model and its processor.

    Raises ``FileNotFoundError`` for a missing folder, ``ValueError`` for an unsupported model type or a folder
    without processor files (tokenizer and image processor: save them with ``processor.save_pretrained``).
    """
    import transformers

    folder = Path(checkpoint).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no model checkpoint at {folder}: expected a local folder with config.json and the weights "
            f"(e.g. a Hugging Face snapshot of openai/clip-vit-base-patch32, kakaobrain/align-base, BAAI/AltCLIP "
            f"or nvidia/groupvit-gcc-yfcc), with its processor files")
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in ZERO_SHOT_MODELS:
        raise ValueError(f"{folder} holds a {config.model_type!r} model; supported: {sorted(ZERO_SHOT_MODELS)}")
    model = getattr(transformers, ZERO_SHOT_MODELS[config.model_type]).from_pretrained(folder, local_files_only=True)
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{folder} has no usable processor ({error}); save the model's processor there too: "
                         f"processor.save_pretrained('{folder}')") from error
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise ValueError(f"{folder}: expected a processor with a tokenizer and an image processor, got "
                         f"{type(processor).__name__}")
    return ZeroShotEncoder(model).to(device), processor


@torch.no_grad()
def embed_captions(encoder: ZeroShotEncoder, processor, captions: Sequence[str], batch_size: int = 64,
                   progress: bool = False) -> torch.Tensor:
    """(M, D) unit-norm embeddings of ``captions``, tokenised by the model's own tokenizer (truncated)."""
    device = next(encoder.parameters()).device
    parts = []
    for start in tqdm(range(0, len(captions), batch_size), desc="captions", disable=not progress):
        tokens = processor.tokenizer(list(captions[start : start + batch_size]), padding=True, truncation=True,
                                     return_tensors="pt")
        parts.append(encoder.encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu())
    return torch.cat(parts)


@torch.no_grad()
def embed_images(encoder: ZeroShotEncoder, processor, image_paths: Sequence, batch_size: int = 32,
                 progress: bool = False) -> torch.Tensor:
    """(N, D) unit-norm embeddings of image files, prepared by the model's own image processor."""
    from .data import load_image

    device = next(encoder.parameters()).device
    parts = []
    for start in tqdm(range(0, len(image_paths), batch_size), desc="images", disable=not progress):
        images = [load_image(path) for path in image_paths[start : start + batch_size]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        parts.append(encoder.encode_image(pixels.to(device)).cpu())
    return torch.cat(parts)


def evaluate_zero_shot(checkpoint: str | os.PathLike, split, device: str | torch.device = "cpu",
                       batch_size: int = 32, progress: bool = False) -> dict:
    """Zero-shot retrieval metrics of the checkpoint on an :class:`xmr.data.ImageCaptionSplit` (VSE++ protocol).

    Returns the metrics of :func:`xmr.metrics.retrieval_metrics` plus ``model_type`` and ``parameters``.
    """
    encoder, processor = load_zero_shot_model(checkpoint, device)
    image_embeddings = embed_images(encoder, processor, split.image_paths, batch_size, progress)  # (N, D)
    caption_embeddings = embed_captions(encoder, processor, split.captions, 2 * batch_size, progress)  # (5N, D)
    sims = image_embeddings @ caption_embeddings.T  # (N, 5N)
    metrics = retrieval_metrics(sims, captions_per_image=split.captions_per_image)
    return {**metrics, "model_type": encoder.model_type,
            "parameters": sum(p.numel() for p in encoder.model.parameters())}
