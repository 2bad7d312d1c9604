"""Caption-only test sets: the Karpathy test and dev captions of MS-COCO and Flickr30K in the SCAN/VSE++
"precomp" layout (one caption a line, 5 lines per image, image-major), and their pooled text features.

There are no images or image features here: these sets serve text-side evaluation, e.g. shi2024's
caption-to-caption generalisation test (a text space trained on Flickr8k, evaluated on COCO and Flickr30K).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .root import DatasetLayout

CAPTIONS_PER_IMAGE = 5
# (dataset, split) -> file under the dataset folder; the split names say how many images each file covers.
TEST_CAPTION_FILES = {
    ("coco", "test5k"): "coco_precomp/testall_caps.txt",
    ("coco", "test1k"): "coco_precomp/test_caps.txt",
    ("coco", "dev"): "coco_precomp/dev_caps.txt",
    ("flickr30k", "test"): "f30k_precomp/test_caps.txt",
    ("flickr30k", "dev"): "f30k_precomp/dev_caps.txt",
}

TEST_CAPTIONS = DatasetLayout(
    name="COCO / Flickr30K test captions (SCAN precomp layout)",
    folder="coco_flickr30k_test_captions",
    files=(
        "coco_precomp/testall_caps.txt  (COCO 5K test: 25,000 lines, 5 per image, image-major)",
        "coco_precomp/test_caps.txt  (COCO 1K test: 5,000 lines)",
        "coco_precomp/dev_caps.txt  (COCO dev: 5,000 lines)",
        "f30k_precomp/test_caps.txt  (Flickr30K 1K test: 5,000 lines)",
        "f30k_precomp/dev_caps.txt  (Flickr30K dev: 5,070 lines)",
    ),
    source=("the Karpathy splits (Karpathy & Fei-Fei, CVPR 2015) of MS-COCO captions (Chen et al. 2015) and "
            "Flickr30K (Young et al., TACL 2014), as the *_caps.txt files of the SCAN precomp data "
            "(Lee et al., ECCV 2018): https://github.com/kuanghuei/SCAN#download-data"),
)


@dataclass(frozen=True)
class CaptionSet:
    """Captions without images, image-major: caption ``j`` describes image ``j // captions_per_image``.

    It has the ``dataset``, ``split`` and ``captions`` that :mod:`xmr.features` keys its caches by.
    """

    dataset: str
    split: str
    captions: tuple[str, ...]
    captions_per_image: int = CAPTIONS_PER_IMAGE

    def __post_init__(self) -> None:
        if not self.captions or len(self.captions) % self.captions_per_image:
            raise ValueError(f"{len(self.captions)} captions are not a positive multiple of "
                             f"{self.captions_per_image} captions per image")

    def __len__(self) -> int:
        """The number of images the captions describe."""
        return len(self.captions) // self.captions_per_image

    def caption_image_index(self) -> torch.Tensor:
        """(N * captions_per_image,) long: the image index of every caption."""
        return torch.arange(len(self.captions)) // self.captions_per_image

    def subset(self, num_images: int) -> CaptionSet:
        """The captions of the first ``num_images`` images (for smoke runs)."""
        if not 1 <= num_images <= len(self):
            raise ValueError(f"num_images must be in 1..{len(self)}, got {num_images}")
        return dataclasses.replace(self, captions=self.captions[: num_images * self.captions_per_image])


def load_test_captions(dataset: str, split: str = "test", root: str | os.PathLike | None = None) -> CaptionSet:
    """The captions of one set in ``TEST_CAPTION_FILES``: ``("coco", "test5k" | "test1k" | "dev")`` or
    ``("flickr30k", "test" | "dev")``. Raises ``DatasetNotFoundError`` / ``DatasetFormatError``
    (naming the expected layout and the official source) for a missing or malformed file."""
    if (dataset, split) not in TEST_CAPTION_FILES:
        raise ValueError(f"unknown caption set {dataset}/{split}; choose from "
                         f"{', '.join(f'{d}/{s}' for d, s in TEST_CAPTION_FILES)}")
    relative = TEST_CAPTION_FILES[dataset, split]
    directory = TEST_CAPTIONS.locate(root, required=(relative,))
    path = directory / relative
    lines = TEST_CAPTIONS.read_lines(path, directory)  # UTF-8 and not empty, or a DatasetFormatError
    blank = [number for number, line in enumerate(lines, start=1) if not line.strip()]
    if blank:
        raise TEST_CAPTIONS.malformed(f"{path}: empty caption on line(s) {blank[:5]}", directory)
    if not lines or len(lines) % CAPTIONS_PER_IMAGE:
        raise TEST_CAPTIONS.malformed(f"{path}: {len(lines)} lines are not {CAPTIONS_PER_IMAGE} captions per image",
                                      directory)
    return CaptionSet(dataset, split, tuple(line.strip() for line in lines))
