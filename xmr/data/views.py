"""Positive sets of one modality, for training a space within it (shi2024 Secs. 3.1-3.2).

An item holds several members of one positive set and its label: :class:`CaptionGroups` the captions of one image,
:class:`RegionCropViews` random crops of one image's cached region grid (:func:`random_crop_weights`), mean-pooled
(the full grid's mean is exactly the pooled feature; a crop keeps the regions of a sub-rectangle of the image).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class CaptionGroups(Dataset):
    """One item per image holding all its captions' inputs, a positive set.

    ``text`` is (N * captions_per_image, C), image-major. An item is ``{"text": (captions_per_image, C),
    "label": image index}``.
    """

    def __init__(self, text: torch.Tensor, captions_per_image: int = 5):
        if len(text) == 0 or len(text) % captions_per_image:
            raise ValueError(f"{len(text)} captions are not a positive multiple of {captions_per_image}")
        self.text, self.captions_per_image = text, captions_per_image

    def __len__(self) -> int:
        return len(self.text) // self.captions_per_image

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = index * self.captions_per_image
        label = torch.tensor(index)
        return {"text": self.text[start : start + self.captions_per_image].float(), "label": label}


def random_crop_weights(views: int, side: int = 7, min_crop: int = 4,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(views, side * side) averaging weights of random axis-aligned crops of a ``side`` x ``side`` grid.

    Each crop has height and width drawn uniformly in ``min_crop .. side`` and a uniform position; its weights
    are 1 / (h * w) inside, 0 outside, in the row-major order of the flattened grid.
    """
    if not 1 <= min_crop <= side:
        raise ValueError(f"min_crop must be in 1..{side}, got {min_crop}")
    weights = torch.zeros(views, side, side)
    for view in range(views):
        height, width = (int(torch.randint(min_crop, side + 1, (1,), generator=generator)) for _ in range(2))
        top = int(torch.randint(0, side - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, side - width + 1, (1,), generator=generator))
        weights[view, top : top + height, left : left + width] = 1.0 / (height * width)
    return weights.flatten(1)


class RegionCropViews(Dataset):
    """``views`` random crops of each image's cached region grid (N, side * side, C), mean-pooled.

    An item is ``{"image": (views, C) float32, "label": class}`` with the class from ``labels`` (same-class
    images are positives too) or, without labels, the image's own index (views of one image are the only
    positives). Crops are drawn from torch's global generator, which :func:`xmr.train.fit` seeds per epoch.
    """

    def __init__(self, grid: torch.Tensor, views: int = 2, min_crop: int = 4, labels: torch.Tensor | None = None):
        side = int(round(grid.shape[1] ** 0.5))
        if grid.dim() != 3 or side * side != grid.shape[1]:
            raise ValueError(f"expected a (N, side * side, C) region grid, got {tuple(grid.shape)}")
        if labels is not None and labels.shape != grid.shape[:1]:
            raise ValueError(f"labels must have shape ({len(grid)},), got {tuple(labels.shape)}")
        if views < 1:
            raise ValueError(f"views must be positive, got {views}")
        random_crop_weights(1, side, min_crop)  # validates min_crop
        self.grid, self.views, self.min_crop, self.side = grid, views, min_crop, side
        self.labels = labels

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        weights = random_crop_weights(self.views, self.side, self.min_crop)  # (V, R)
        views = weights @ self.grid[index].float()  # (V, C)
        label = self.labels[index] if self.labels is not None else torch.tensor(index)
        return {"image": views, "label": label}
