"""Flickr8k (Hodosh, Young & Hockenmaier 2013): image-caption splits, and the image container shared with
the synthetic set."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .root import DAMAGED_ADVICE, CorruptImageError, DatasetFormatError, DatasetLayout, first_few, repeated

FLICKR8K_SPLITS = ("train", "dev", "test")
FLICKR8K_CAPTIONS_PER_IMAGE = 5
FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
# The shared copy's 224 x 224 images, then the official download's full-resolution folder (sic) and its variant.
FLICKR8K_IMAGE_FOLDERS = ("images", "Flicker8k_Dataset", "Flickr8k_Dataset")

# In the official token file the first caption of 2258277193_586949ec62.jpg is keyed
# "2258277193_586949ec62.jpg.1#0" while its captions #1-#4 use the plain name; no image of either name is in
# the release or in any split. Mapping the key back gives that image its 5 captions and no phantom image.
FLICKR8K_QUIRK_KEYS = {"2258277193_586949ec62.jpg.1": "2258277193_586949ec62.jpg"}

FLICKR8K = DatasetLayout(
    name="Flickr8k",
    folder="flickr8k",
    files=(
        f"{FLICKR8K_TOKEN_FILE}  (<image>.jpg#<0-4><TAB><caption>)",
        *(f"Flickr_8k.{split}Images.txt" for split in FLICKR8K_SPLITS),
        "images/<image>.jpg  (any size; resized on loading)",
        "Flicker8k_Dataset/<image>.jpg  (instead of images/: the official download, sic; or Flickr8k_Dataset/)",
    ),
    source=(
        "M. Hodosh, P. Young and J. Hockenmaier (2013), 'Framing Image Description as a Ranking Task', "
        "JAIR 47:853-899; request the data with the Illinois Flickr8k form https://forms.illinois.edu/sec/1713398"
    ),
)


@dataclass(frozen=True)
class ImageCaptionSplit:
    """Images and their captions, image-major: caption ``j`` belongs to image ``j // captions_per_image``."""

    dataset: str
    split: str
    image_ids: tuple[str, ...]
    image_paths: tuple[Path, ...]
    captions: tuple[str, ...]
    captions_per_image: int = FLICKR8K_CAPTIONS_PER_IMAGE

    def __post_init__(self) -> None:
        if not self.image_ids:
            raise ValueError(f"{self.dataset}/{self.split} has no images")
        if repeated(self.image_ids):
            raise ValueError(f"{self.dataset}/{self.split} lists images more than once: "
                             f"{first_few(repeated(self.image_ids))}")
        if len(self.image_paths) != len(self.image_ids):
            raise ValueError(f"{len(self.image_ids)} image ids but {len(self.image_paths)} image paths")
        if len(self.captions) != len(self.image_ids) * self.captions_per_image:
            raise ValueError(
                f"{len(self.captions)} captions for {len(self.image_ids)} images x {self.captions_per_image}"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def caption_image_index(self) -> torch.Tensor:
        """(N * captions_per_image,) long: the image index of every caption."""
        return torch.arange(len(self.captions)) // self.captions_per_image

    def subset(self, num_images: int) -> ImageCaptionSplit:
        """The first ``num_images`` images and their captions (for smoke runs)."""
        if not 1 <= num_images <= len(self):
            raise ValueError(f"num_images must be in 1..{len(self)}, got {num_images}")
        return dataclasses.replace(
            self,
            image_ids=self.image_ids[:num_images],
            image_paths=self.image_paths[:num_images],
            captions=self.captions[: num_images * self.captions_per_image],
        )


def load_image(path: str | os.PathLike, size: int = 224) -> Image.Image:
    """An RGB image resized to ``size`` x ``size`` (bicubic, aspect not kept, as the shared copy is)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # decodes the whole file, so truncated data fails here
    except FileNotFoundError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise CorruptImageError(f"Cannot decode image {path}: {error}") from error
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return rgb


def read_flickr8k_captions(token_file: Path) -> dict[str, dict[int, str]]:
    """``{image_id: {caption_number: caption}}`` from ``Flickr8k.token.txt``."""
    captions: dict[str, dict[int, str]] = {}
    for line_number, line in enumerate(FLICKR8K.read_lines(token_file, token_file.parent), start=1):
        if not line.strip():
            continue
        key, _, caption = line.partition("\t")
        image_id, _, number = key.rpartition("#")
        image_id = FLICKR8K_QUIRK_KEYS.get(image_id, image_id)
        if not image_id or not number.isdigit():
            raise FLICKR8K.malformed(f"{token_file}:{line_number}: expected '<image>#<n><TAB><caption>'",
                                     token_file.parent)
        by_number = captions.setdefault(image_id, {})
        if int(number) in by_number:
            raise FLICKR8K.malformed(f"{token_file}:{line_number}: duplicate caption key {key}", token_file.parent)
        by_number[int(number)] = caption.strip()
    return captions


def find_flickr8k_image_folder(directory: Path) -> Path:
    """The first of ``FLICKR8K_IMAGE_FOLDERS`` present in the Flickr8k folder."""
    for name in FLICKR8K_IMAGE_FOLDERS:
        if (directory / name).is_dir():
            return directory / name
    raise FLICKR8K.not_found(f"no image folder ({' or '.join(FLICKR8K_IMAGE_FOLDERS)}) in {directory}", directory)


def flickr8k_split_file(split: str) -> str:
    return f"Flickr_8k.{split}Images.txt"


def read_flickr8k_split(directory: Path, split: str) -> tuple[str, ...]:
    """The image ids of one split file, checked to be non-empty, unique and disjoint from the other splits'."""
    path = directory / flickr8k_split_file(split)
    image_ids = tuple(line.strip() for line in FLICKR8K.read_lines(path, directory) if line.strip())
    twice = repeated(image_ids)
    if twice:
        raise FLICKR8K.malformed(f"{path} lists {len(twice)} image(s) more than once: {first_few(twice)}; "
                                 f"{DAMAGED_ADVICE}", directory)
    for other in FLICKR8K_SPLITS:
        other_path = directory / flickr8k_split_file(other)
        if other == split or not other_path.exists():
            continue
        try:
            other_ids = {line.strip() for line in FLICKR8K.read_lines(other_path, directory)}
        except DatasetFormatError:
            continue  # loading that split reports it
        shared = [image_id for image_id in image_ids if image_id in other_ids]
        if shared:
            raise FLICKR8K.malformed(
                f"{len(shared)} image(s) are in both {path.name} and {other_path.name}, so the {split} and {other} "
                f"splits overlap: {first_few(shared)}; {DAMAGED_ADVICE}", directory)
    return image_ids


def load_flickr8k(split: str, root: str | os.PathLike | None = None) -> ImageCaptionSplit:
    """One official Flickr8k split (6000 / 1000 / 1000 images), 5 captions per image in #0-#4 order.

    Raises :class:`DatasetFormatError` for an empty or non-UTF-8 file, or an image listed twice or in two splits.
    """
    if split not in FLICKR8K_SPLITS:
        raise ValueError(f"Flickr8k split must be one of {FLICKR8K_SPLITS}, got {split!r}")
    split_file = flickr8k_split_file(split)
    directory = FLICKR8K.locate(root, required=(FLICKR8K_TOKEN_FILE, split_file))
    image_folder = find_flickr8k_image_folder(directory)
    image_ids = read_flickr8k_split(directory, split)

    on_disk = set(os.listdir(image_folder))
    absent = [image_id for image_id in image_ids if image_id not in on_disk]
    if absent:
        raise FLICKR8K.not_found(
            f"{len(absent)} of {len(image_ids)} {split} images are missing from {image_folder}, "
            f"e.g. {', '.join(absent[:3])}", directory)

    captions_by_image = read_flickr8k_captions(directory / FLICKR8K_TOKEN_FILE)
    expected_numbers = set(range(FLICKR8K_CAPTIONS_PER_IMAGE))
    incomplete = [image_id for image_id in image_ids
                  if set(captions_by_image.get(image_id, {})) != expected_numbers]
    if incomplete:
        raise FLICKR8K.malformed(
            f"{len(incomplete)} {split} images lack captions #0-#{FLICKR8K_CAPTIONS_PER_IMAGE - 1} in "
            f"{FLICKR8K_TOKEN_FILE}, e.g. {', '.join(incomplete[:3])}", directory)

    return ImageCaptionSplit(
        dataset="flickr8k",
        split=split,
        image_ids=image_ids,
        image_paths=tuple(image_folder / image_id for image_id in image_ids),
        captions=tuple(captions_by_image[image_id][number]
                       for image_id in image_ids for number in range(FLICKR8K_CAPTIONS_PER_IMAGE)),
    )
