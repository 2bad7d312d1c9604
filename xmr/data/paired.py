"""A split's cached inputs, and image-caption pairs over them, the input of :func:`xmr.train.fit`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

CAPTION_CHOICES = ("random", "first", "all")


@dataclass
class CaptionInputs:
    """What the towers read for one split: image inputs (N, ...), caption inputs (5N, ...), optional mask
    (:func:`xmr.features.load_caption_inputs`)."""

    image: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor | None = None
    captions_per_image: int = 5
    # human relevance judgements of the split's pairs ({"expert": ..., "crowd": ...}: xmr.data.relevance), which
    # the test evaluation scores beside the paired captions; empty where there are none (any split but test)
    judgements: dict = field(default_factory=dict)


class PairedFeatures(Dataset):
    """Pairs of image inputs (N, ...) and caption inputs (N * captions_per_image, ...), captions image-major.

    ``caption_choice``:
      - ``"random"``: one item per image with one of its captions drawn afresh each epoch (timofeev2022);
        the draw depends only on ``(seed, epoch)``, so a resumed run sees the same pairs;
      - ``"first"``: one item per image with its first caption (a fixed validation pairing);
      - ``"all"``: one item per caption (VSE++/CODER style epochs).

    An item is a dict ``{"image", "text", "image_index"}`` plus ``"text_mask"`` when a mask is given.
    """

    def __init__(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                 captions_per_image: int = 5, caption_choice: str = "random", seed: int = 0):
        if caption_choice not in CAPTION_CHOICES:
            raise ValueError(f"caption_choice must be one of {CAPTION_CHOICES}, got {caption_choice!r}")
        if image.shape[0] == 0:
            raise ValueError("no images: the split these features come from is empty")
        if text.shape[0] != image.shape[0] * captions_per_image:
            raise ValueError(
                f"{image.shape[0]} images need {image.shape[0] * captions_per_image} captions "
                f"({captions_per_image} each, image-major), got {text.shape[0]}"
            )
        if text_mask is not None and text_mask.shape[0] != text.shape[0]:
            raise ValueError("text_mask must have one row per caption")
        self.image, self.text, self.text_mask = image, text, text_mask
        self.captions_per_image = captions_per_image
        self.caption_choice = caption_choice
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's captions (``"random"`` only); called by the training loop before each epoch."""
        num_images = self.image.shape[0]
        if self.caption_choice == "random":
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            offsets = torch.randint(self.captions_per_image, (num_images,), generator=generator)
        else:
            offsets = torch.zeros(num_images, dtype=torch.long)
        self._caption_of_image = torch.arange(num_images) * self.captions_per_image + offsets

    def __len__(self) -> int:
        return self.text.shape[0] if self.caption_choice == "all" else self.image.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.caption_choice == "all":
            caption, image_index = index, index // self.captions_per_image
        else:
            caption, image_index = int(self._caption_of_image[index]), index
        item = {"image": self.image[image_index], "text": self.text[caption], "image_index": image_index}
        if self.text_mask is not None:
            item["text_mask"] = self.text_mask[caption]
        return item
