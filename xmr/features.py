"""Extract backbone features once and keep them on disk.

Extracting all of Flickr8k takes minutes on a CPU, so every extraction goes through :class:`FeatureCache`:
one file per (backbone, weights, dataset, split, items, preprocessing, split point), named by a hash of that
key, written to a temporary file and renamed into place (an interrupted run leaves no half file), and checked
against its key when read (a corrupt or mismatched file is re-extracted, with a warning).

The *split point* (``trainable_top``) decides what is stored: with 0 the backbone's final features (image: a
7 x 7 grid of 1280-d regions; text: 384-d tokens and the attention mask), with k > 0 the activations below the
top k stages, for methods that fine-tune those stages on cached inputs (see :mod:`xmr.encoders`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .encoders import ImageBackbone, TextBackbone

CACHE_ENV_VAR = "XMR_CACHE"
CACHE_FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$XMR_CACHE``, else ``~/.cache/xmr`` (outside the repository: caches are never committed)."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "xmr"))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class FeatureCache:
    """Tensors on disk keyed by a JSON-able description of how they were made."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    def path(self, key: dict) -> Path:
        readable = "-".join(str(key[name]) for name in ("dataset", "split", "backbone", "layer") if name in key)
        return self.directory / f"{readable}-{_digest(key)[:16]}.pt"

    def load(self, key: dict) -> dict[str, torch.Tensor] | None:
        """The cached tensors for ``key``, or None on a miss. A corrupt or mismatched file counts as a miss."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            # Memory-mapped: a caller that needs only the pooled features never reads the region grid.
            stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if stored["key"] != key:
                raise ValueError("stored key differs")
            return stored["tensors"]
        except Exception as error:  # noqa: BLE001 - any unreadable file is re-extracted
            warnings.warn(f"feature cache file {path} is unreadable ({error}); extracting again", stacklevel=2)
            return None

    def save(self, key: dict, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.path(key)
        atomic_torch_save({"key": key, "tensors": tensors}, path)
        return path


def _weights_fingerprint(backbone: torch.nn.Module) -> str:
    """A hash of the backbone's parameter bytes: other or re-trained weights never hit a stale entry."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class ExtractionSettings:
    batch_size: int = 64
    device: str = "cpu"
    progress: bool = True
    cache: FeatureCache | None = None


def _key(split, backbone, modality: str, items: list[str], preprocessing: str) -> dict:
    return {
        "version": CACHE_FORMAT_VERSION,
        "dataset": split.dataset,
        "split": split.split,
        "backbone": backbone.name,
        "layer": "final" if backbone.trainable_top == 0 else f"below_top{backbone.trainable_top}",
        "weights": _weights_fingerprint(backbone),
        "modality": modality,
        "items": _digest(items),
        "count": len(items),
        "preprocessing": preprocessing,
    }


@torch.no_grad()
def image_features(split, backbone: ImageBackbone | None = None,
                   settings: ExtractionSettings | None = None) -> dict[str, torch.Tensor]:
    """Backbone features of every image of ``split`` (an :class:`xmr.data.ImageCaptionSplit`), cached.

    Returns ``grid`` (N, 49, 1280) float16 and ``pooled`` (N, 1280) float32 for a frozen backbone, or
    ``lower`` (N, C, 7, 7) float16 activations below the trainable stages.
    """
    from .data import load_image

    backbone = backbone if backbone is not None else ImageBackbone()
    settings = settings or ExtractionSettings()
    cache = settings.cache or FeatureCache()
    key = _key(split, backbone, "image", [str(i) for i in split.image_ids],
               f"load_image-resize{224}-bicubic-mean{backbone.mean}-std{backbone.std}")
    cached = cache.load(key)
    if cached is not None:
        return cached
    backbone = backbone.to(settings.device).eval()
    outputs: dict[str, list[torch.Tensor]] = {}
    paths = list(split.image_paths)
    starts = range(0, len(paths), settings.batch_size)
    for start in tqdm(starts, desc=f"{split.dataset}/{split.split} images", disable=not settings.progress):
        images = [load_image(path) for path in paths[start : start + settings.batch_size]]
        pixels = backbone.preprocess(images).to(settings.device)
        lower = backbone.forward_lower(pixels)
        if backbone.trainable_top == 0:
            result = backbone.forward_upper(lower)
            batch = {"grid": result["grid"].half(), "pooled": result["pooled"].float()}
        else:
            batch = {"lower": lower.half()}
        for name, tensor in batch.items():
            outputs.setdefault(name, []).append(tensor.cpu())
    tensors = {name: torch.cat(parts) for name, parts in outputs.items()}
    cache.save(key, tensors)
    return tensors


@torch.no_grad()
def text_features(split, backbone: TextBackbone | None = None, settings: ExtractionSettings | None = None,
                  pooled_only: bool = False) -> dict[str, torch.Tensor]:
    """Backbone features of every caption of ``split`` (image-major order), cached.

    Returns ``tokens`` (M, L, 384) float16, ``mask`` (M, L) and ``pooled`` (M, 384) float32 for a frozen
    backbone, or ``lower`` (M, L, 384) float16 and ``mask`` below the trainable layers. L is the longest
    caption of the split in tokens (at most ``backbone.max_length``). ``pooled_only`` computes, caches and
    returns ``pooled`` alone (a frozen backbone only): for caption sets whose token features would be too
    large to keep (COCO's 25,000 test captions: about 1 GB). ``split`` needs ``captions``, ``dataset`` and
    ``split``.
    """
    backbone = backbone if backbone is not None else TextBackbone()
    if pooled_only and backbone.trainable_top != 0:
        raise ValueError("pooled features come from the whole (frozen) backbone: use trainable_top=0")
    settings = settings or ExtractionSettings()
    cache = settings.cache or FeatureCache()
    captions = list(split.captions)
    key = _key(split, backbone, "text_pooled" if pooled_only else "text", captions,
               f"wordpiece-uncased-max{backbone.max_length}")
    cached = cache.load(key)
    if cached is not None:
        return cached
    backbone = backbone.to(settings.device).eval()
    length = int(backbone.tokenize(captions)["attention_mask"].sum(1).max())
    parts: dict[str, list[torch.Tensor]] = {}
    starts = range(0, len(captions), settings.batch_size)
    for start in tqdm(starts, desc=f"{split.dataset}/{split.split} captions", disable=not settings.progress):
        tokens = backbone.tokenize(captions[start : start + settings.batch_size])
        ids = tokens["input_ids"].to(settings.device)
        mask = tokens["attention_mask"].to(settings.device)
        lower = backbone.forward_lower(ids, mask)
        if pooled_only:
            batch = {"pooled": backbone.forward_upper(lower, mask)["pooled"].float()}
        elif backbone.trainable_top == 0:
            result = backbone.forward_upper(lower, mask)
            batch = {"tokens": result["tokens"].half(), "pooled": result["pooled"].float(), "mask": mask}
        else:
            batch = {"lower": lower.half(), "mask": mask}
        for name, tensor in batch.items():
            if tensor.dim() >= 2 and name != "pooled":  # pad the token axis to the split's longest caption
                pad = [0, 0] * (tensor.dim() - 2) + [0, length - tensor.shape[1]]
                tensor = torch.nn.functional.pad(tensor, pad)
            parts.setdefault(name, []).append(tensor.cpu())
    tensors = {name: torch.cat(chunks) for name, chunks in parts.items()}
    cache.save(key, tensors)
    return tensors
