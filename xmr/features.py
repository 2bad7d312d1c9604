"""Extract backbone features once and keep them on disk.

Extracting all of Flickr8k takes minutes on a CPU, so every extraction goes through :class:`FeatureCache`:
one file per (backbone, weights, dataset, split, items, preprocessing, split point), named by a hash of that
key. The key holds what the features were computed from: the bytes of every image file (a replaced image is a
new entry), the caption text, the backbone's weights and the preprocessing (tokenizer included). A file is
written to a temporary file and renamed into place (an interrupted run leaves no half file; orphaned temporary
files are removed later), stores a sha256 digest of every tensor, and is checked against its key and digests
when read: an unreadable, mismatched or corrupt file is re-extracted, with a warning that names it.

The *split point* (``trainable_top``) decides what is stored: with 0 the backbone's final features (image: a
7 x 7 grid of 1280-d regions; text: 384-d tokens and the attention mask), with k > 0 the activations below the
top k stages, for methods that fine-tune those stages on cached inputs (see :mod:`xmr.encoders`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: concurrent extractions of one entry are not serialised
    fcntl = None

from .data import CaptionInputs, DatasetNotFoundError, load_crowd_judgements, load_expert_judgements, load_flickr8k
from .data.test_captions import CaptionSet
from .encoders import ImageBackbone, TextBackbone
from .io import atomic_torch_save, writer_tag

CACHE_ENV_VAR = "XMR_CACHE"
CACHE_FORMAT_VERSION = 2  # 2: image content and tokenizer in the key, tensor digests in the file
# A temporary file not written to for this long is an orphan of an interrupted save (a live writer keeps writing).
STALE_TEMPORARY_SECONDS = 10 * 60


def default_cache_dir() -> Path:
    """``$XMR_CACHE``, else ``~/.cache/xmr`` (outside the repository: caches are never committed)."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "xmr"))


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


_TEMPORARY_NAME = re.compile(r"^\..*\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _process_is_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap check: rely on the file's age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(directory: str | os.PathLike,
                             max_age_seconds: float = STALE_TEMPORARY_SECONDS) -> list[Path]:
    """Delete the orphaned ``.*.tmp`` files of interrupted saves in ``directory``; returns those deleted.

    A temporary file is stale when it has not been written to for ``max_age_seconds``, or when its name says
    it was written on this host by a process that no longer exists. Others belong to live writers and stay.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    host, now, removed = writer_tag().rsplit("-", 1)[0], time.time(), []
    for entry in directory.iterdir():
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:  # renamed into place or removed meanwhile
            continue
        match = _TEMPORARY_NAME.match(entry.name)
        dead_writer = (match is not None and match["host"] == host and int(match["pid"]) != os.getpid()
                       and not _process_is_alive(int(match["pid"])))
        if age > max_age_seconds or dead_writer:
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes, read in place (a memory-mapped tensor is not copied)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureCache:
    """Tensors on disk keyed by a JSON-able description of how they were made, each checked by its digest."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        remove_stale_temporaries(self.directory)

    @contextlib.contextmanager
    def exclusive(self, key: dict):
        """Hold an exclusive lock on ``key``'s entry (``flock`` on a ``.lock`` file beside it; released when the
        holder exits or dies), so that concurrent processes extract the same features once."""
        path = self.path(key).with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def path(self, key: dict) -> Path:
        readable = "-".join(str(key[name]) for name in ("dataset", "split", "backbone", "layer") if name in key)
        return self.directory / f"{readable}-{_digest(key)[:16]}.pt"

    def load(self, key: dict) -> dict[str, torch.Tensor] | None:
        """The cached tensors for ``key``, or None on a miss. A corrupt or mismatched file counts as a miss.

        Tensors stay memory-mapped (no copy in memory); checking their digests reads each once, at about 1 GB/s.
        """
        path = self.path(key)
        if not path.exists():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if stored["key"] != key:
                raise ValueError("stored key differs")
            tensors, digests = stored["tensors"], stored["digests"]
            if set(tensors) != set(digests):
                raise ValueError(f"tensors {sorted(tensors)} but digests for {sorted(digests)}")
            for name, tensor in tensors.items():
                if tensor_digest(tensor) != digests[name]:
                    raise ValueError(f"the bytes of {name!r} {tuple(tensor.shape)} differ from their saved digest")
            return tensors
        except Exception as error:  # noqa: BLE001 - any unreadable file is re-extracted
            warnings.warn(f"feature cache file {path} is unreadable or corrupt ({error}); extracting it again",
                          stacklevel=2)
            return None

    def save(self, key: dict, tensors: dict[str, torch.Tensor]) -> Path:
        remove_stale_temporaries(self.directory)
        path = self.path(key)
        digests = {name: tensor_digest(tensor) for name, tensor in tensors.items()}
        atomic_torch_save({"key": key, "tensors": tensors, "digests": digests}, path)
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


def _tokenizer_fingerprint(backbone) -> str:
    """A hash of the tokenizer's full definition (vocabulary, normalisation), or "" where there is none."""
    tokenizer = getattr(backbone, "tokenizer", None)
    if tokenizer is None:
        return ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(definition.encode()).hexdigest()[:16]


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
    backbone = backbone if backbone is not None else ImageBackbone()
    settings = settings or ExtractionSettings()
    cache = settings.cache or FeatureCache()
    # What the features come from: each image's name and bytes (hashing Flickr8k's 8,091 JPEGs takes ~0.2 s).
    items = [f"{image_id}:{file_digest(path)}" for image_id, path in zip(split.image_ids, split.image_paths)]
    key = _key(split, backbone, "image", items,
               f"load_image-resize{224}-bicubic-mean{backbone.mean}-std{backbone.std}")
    with cache.exclusive(key):  # a concurrent run needing the same features waits for them, then reads them
        cached = cache.load(key)
        if cached is None:
            cached = _extract_images(split, backbone, settings)
            cache.save(key, cached)
    return cached


def _extract_images(split, backbone: ImageBackbone, settings: ExtractionSettings) -> dict[str, torch.Tensor]:
    from .data import load_image

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
    return {name: torch.cat(parts) for name, parts in outputs.items()}


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
               f"wordpiece-uncased-max{backbone.max_length}-tokenizer{_tokenizer_fingerprint(backbone)}")
    with cache.exclusive(key):  # a concurrent run needing the same features waits for them, then reads them
        cached = cache.load(key)
        if cached is None:
            cached = _extract_texts(split, backbone, settings, captions, pooled_only)
            cache.save(key, cached)
    return cached


def _extract_texts(split, backbone: TextBackbone, settings: ExtractionSettings, captions: list[str],
                   pooled_only: bool) -> dict[str, torch.Tensor]:
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
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def load_caption_inputs(split: str, image_top: int = 0, text_top: int = 0, num_images: int | None = None,
                        root=None, settings: ExtractionSettings | None = None, regions: bool = False) -> CaptionInputs:
    """Cached Flickr8k inputs for ``split``, per modality: the activations below the ``image_top`` /
    ``text_top`` trainable stages when those are > 0; else the frozen backbone's pooled features, or with
    ``regions=True`` its region/token features (the 7 x 7 grid (N, 49, 1280), the tokens (5N, L, 384) with their
    mask; float16). ``num_images`` keeps the first images (smoke runs). The test split carries its human
    relevance judgements (:func:`human_judgements`)."""
    data = load_flickr8k(split, root=root)
    if num_images is not None:
        data = data.subset(min(num_images, len(data)))
    images = image_features(data, ImageBackbone(trainable_top=image_top), settings)
    texts = text_features(data, TextBackbone(trainable_top=text_top), settings)
    image = images["lower"] if image_top else images["grid"] if regions else images["pooled"]
    judgements = human_judgements(split, len(data), root)
    if text_top or regions:
        return CaptionInputs(image, texts["lower"] if text_top else texts["tokens"], texts["mask"],
                             data.captions_per_image, judgements)
    return CaptionInputs(image, texts["pooled"], None, data.captions_per_image, judgements)


def human_judgements(split: str, num_images: int, root=None) -> dict:
    """Flickr8k's expert and crowd judgements of the first ``num_images`` images of ``split``
    (:func:`xmr.data.load_expert_judgements`, :func:`xmr.data.load_crowd_judgements`): only the test split has
    them; ``{}`` where the files are missing."""
    if split != "test":
        return {}
    try:
        loaded = {"expert": load_expert_judgements(split, root), "crowd": load_crowd_judgements(split, root)}
    except DatasetNotFoundError:
        return {}
    return {source: judgements.first_images(num_images) for source, judgements in loaded.items()}


def load_region_grid(split: str, num_images: int | None = None, root=None,
                     settings: ExtractionSettings | None = None) -> torch.Tensor:
    """The cached (N, 49, 1280) float16 EfficientNet-Lite0 region grid of a Flickr8k split (stage-2 crops)."""
    data = load_flickr8k(split, root=root)
    if num_images is not None:
        data = data.subset(min(num_images, len(data)))
    return image_features(data, ImageBackbone(trainable_top=0), settings)["grid"]


def pooled_caption_features(captions: CaptionSet, backbone: TextBackbone | None = None,
                            settings: ExtractionSettings | None = None) -> torch.Tensor:
    """(M, 384) float32 mean-pooled all-MiniLM-L6-v2 features of every caption, cached on disk.

    Only the pooled features are stored (:func:`xmr.features.text_features` with ``pooled_only=True``): 25,000
    COCO captions would take about 1 GB with their token features.
    """
    return text_features(captions, backbone, settings, pooled_only=True)["pooled"]
