"""Flickr8k's human relevance judgements beyond the five paired captions (Hodosh, Young & Hockenmaier 2013,
"Framing Image Description as a Ranking Task", JAIR 47:853-899, Sec. 4).

The release judges image-caption pairs of its test images, most of them not paired in ``Flickr8k.token.txt``:

- ``ExpertAnnotations.txt``: ``<image>.jpg<TAB><image>.jpg#<n><TAB><s1><TAB><s2><TAB><s3>``, three expert scores
  from 1 ("does not describe the image at all") to 4 ("describes the image"); 3 is "almost describes the image,
  with minor mistakes".
- ``CrowdFlowerAnnotations.txt``: ``<image>.jpg<TAB><image>.jpg#<n><TAB><proportion yes><TAB><yes><TAB><no>``,
  at least three crowd votes per pair; "yes" means the caption describes the image, possibly with minor mistakes.

What the shared copy holds (checked in ``tests/test_relevance.py``): 5,822 expert pairs whose images are all
1,000 test images (2 to 10 judged captions each) and whose captions come from 977 of them; 47,830 crowd pairs
covering all 1,000 test images on both sides (10 to 120 judged captions per image, 3 to 6 votes per pair). Every
judged caption is caption ``#2`` of its image. No pair is listed twice within a file; 2,329 pairs are in both.

Indices follow :func:`xmr.data.load_flickr8k`: image ``i`` is ``load_flickr8k(split).image_ids[i]`` and caption
``j = i_caption * 5 + n`` is caption ``#n`` of image ``i_caption`` in the split's image-major caption list, so
``(image_index, caption_index)`` address ``sims[image_index, caption_index]`` of a test similarity matrix.

Split rule: a pair is kept when its image and its caption's image are both in the requested split; a pair
touching an image of another official split is dropped and counted (``num_outside_split``); an id in no split
file at all is a :class:`DatasetFormatError` (a damaged file, not a pair of another split). The official files
lie wholly in the test split, so ``split="test"`` drops nothing and any other split keeps nothing, which raises
``ValueError``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .flickr8k import (
    FLICKR8K,
    FLICKR8K_CAPTIONS_PER_IMAGE,
    FLICKR8K_SPLITS,
    flickr8k_split_file,
    read_flickr8k_split,
)
from .root import DAMAGED_ADVICE, DatasetFormatError

EXPERT_FILE = "ExpertAnnotations.txt"
CROWD_FILE = "CrowdFlowerAnnotations.txt"
EXPERT_SCORE_RANGE = (1, 4)
# Default relevance thresholds: an expert mean score of at least 3 ("almost describes the image, with minor
# mistakes" or better), and a strict crowd majority of yes votes (a 50/50 split is not relevant).
EXPERT_RELEVANT_MIN_MEAN_SCORE = 3.0
CROWD_RELEVANT_ABOVE_YES_PROPORTION = 0.5
# The crowd file's proportion column is printed with 15 significant digits; it must agree with yes / (yes + no).
_PROPORTION_TOLERANCE = 1e-9

FLICKR8K_JUDGEMENTS = dataclasses.replace(
    FLICKR8K,
    files=(*FLICKR8K.files,
           f"{EXPERT_FILE}  (<image>.jpg<TAB><image>.jpg#<n><TAB><score 1-4> x 3)",
           f"{CROWD_FILE}  (<image>.jpg<TAB><image>.jpg#<n><TAB><proportion yes><TAB><yes><TAB><no>)"),
)


@dataclass(frozen=True)
class RelevanceJudgements:
    """Judged image-caption pairs of one Flickr8k split, as indices into :func:`load_flickr8k`'s lists."""

    source: Path                 # the annotation file read
    split: str
    num_images: int              # images in the split; sims of the split is (num_images, num_images * 5)
    captions_per_image: int
    image_index: torch.Tensor    # (P,) int64: the judged image (the image query)
    caption_index: torch.Tensor  # (P,) int64: the judged caption, image-major
    num_outside_split: int       # pairs of the file dropped because they touch an image of another split

    def __post_init__(self) -> None:
        count = self.image_index.shape[0]
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor) and value.shape[0] != count:
                raise ValueError(f"{name} has {value.shape[0]} rows, image_index {count}")

    @property
    def num_pairs(self) -> int:
        return int(self.image_index.shape[0])

    @property
    def relevance(self) -> torch.Tensor:
        """(P,) float64 graded relevance of every pair (higher = more relevant)."""
        raise NotImplementedError

    def is_relevant(self, threshold: float | None = None) -> torch.Tensor:
        """(P,) bool: the pairs judged relevant under ``threshold`` (None: the subclass's default)."""
        raise NotImplementedError

    def relevant_pairs(self, threshold: float | None = None) -> torch.Tensor:
        """(E, 2) int64 ``(image index, caption index)`` of the pairs judged relevant: the ``extra_positives`` of
        :func:`xmr.metrics.extended_ranks`."""
        keep = self.is_relevant(threshold)
        return torch.stack([self.image_index[keep], self.caption_index[keep]], dim=1)

    def is_paired(self) -> torch.Tensor:
        """(P,) bool: the pairs whose caption is one of the image's own captions."""
        return self.caption_index // self.captions_per_image == self.image_index

    def pairs_per_image(self) -> torch.Tensor:
        """(num_images,) int64: how many captions are judged for each image query."""
        return torch.bincount(self.image_index, minlength=self.num_images)

    def first_images(self, count: int) -> RelevanceJudgements:
        """The judgements among the split's first ``count`` images (both sides), for a subset of the split
        (``ImageCaptionSplit.subset``)."""
        if count >= self.num_images:
            return self
        keep = (self.image_index < count) & (self.caption_index < count * self.captions_per_image)
        rows = {name: value[keep] for name, value in vars(self).items()
                if isinstance(value, torch.Tensor) and value.shape[0] == self.num_pairs}
        return dataclasses.replace(self, num_images=count, **rows)


@dataclass(frozen=True)
class ExpertJudgements(RelevanceJudgements):
    """``ExpertAnnotations.txt``: three expert scores in 1-4 per pair (Hodosh et al. 2013, Sec. 4.1)."""

    scores: torch.Tensor         # (P, 3) int64, in file order
    mean_score: torch.Tensor     # (P,) float64

    @property
    def relevance(self) -> torch.Tensor:
        return self.mean_score

    def is_relevant(self, threshold: float | None = None) -> torch.Tensor:
        """Mean expert score ``>= threshold`` (default 3: "almost describes the image" or better)."""
        return self.mean_score >= (EXPERT_RELEVANT_MIN_MEAN_SCORE if threshold is None else threshold)


@dataclass(frozen=True)
class CrowdJudgements(RelevanceJudgements):
    """``CrowdFlowerAnnotations.txt``: yes/no crowd votes per pair (Hodosh et al. 2013, Sec. 4.2)."""

    yes_proportion: torch.Tensor  # (P,) float64, yes / (yes + no), checked against the file's column
    yes_count: torch.Tensor       # (P,) int64
    no_count: torch.Tensor        # (P,) int64

    @property
    def relevance(self) -> torch.Tensor:
        return self.yes_proportion

    def is_relevant(self, threshold: float | None = None) -> torch.Tensor:
        """Yes proportion ``> threshold`` (default 0.5: a strict majority of yes votes)."""
        return self.yes_proportion > (CROWD_RELEVANT_ABOVE_YES_PROPORTION if threshold is None else threshold)


def _integer(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def _read_pairs(directory: Path, file_name: str, split: str, parse_values):
    """Rows ``(image_index, caption_index, values)`` of one annotation file inside ``split``, and the count of
    pairs dropped as belonging to another split. ``parse_values(fields) -> values or an error string``."""
    path = directory / file_name
    split_ids = {split: read_flickr8k_split(directory, split)}
    for other in FLICKR8K_SPLITS:
        if other != split and (directory / flickr8k_split_file(other)).exists():
            split_ids[other] = read_flickr8k_split(directory, other)
    image_position = {image_id: index for index, image_id in enumerate(split_ids[split])}
    known = {image_id for ids in split_ids.values() for image_id in ids}

    def fail(line_number: int, problem: str) -> DatasetFormatError:
        return FLICKR8K_JUDGEMENTS.malformed(f"{path}:{line_number}: {problem}; {DAMAGED_ADVICE}", directory)

    rows, outside, first_line = [], 0, {}
    for line_number, line in enumerate(FLICKR8K_JUDGEMENTS.read_lines(path, directory), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 5:
            raise fail(line_number, f"expected 5 tab-separated fields (image, caption id, 3 values), got "
                                    f"{len(fields)}: {line[:80]!r}")
        image_id, caption_id = fields[0].strip(), fields[1].strip()
        caption_image, hash_sign, number = caption_id.rpartition("#")
        caption_number = _integer(number)
        if not hash_sign or not caption_image or caption_number is None \
                or caption_number >= FLICKR8K_CAPTIONS_PER_IMAGE:
            raise fail(line_number, f"caption id {caption_id!r} is not '<image>.jpg#<0-"
                                    f"{FLICKR8K_CAPTIONS_PER_IMAGE - 1}>'")
        for role, name in (("image", image_id), ("caption's image", caption_image)):
            if name not in known:
                raise fail(line_number, f"{role} {name!r} is in no Flickr8k split file")
        values = parse_values(fields[2:])
        if isinstance(values, str):
            raise fail(line_number, values)
        if (image_id, caption_id) in first_line:
            raise fail(line_number, f"pair ({image_id}, {caption_id}) is listed again (first on line "
                                    f"{first_line[image_id, caption_id]})")
        first_line[image_id, caption_id] = line_number
        if image_id not in image_position or caption_image not in image_position:
            outside += 1
            continue
        rows.append((image_position[image_id],
                     image_position[caption_image] * FLICKR8K_CAPTIONS_PER_IMAGE + caption_number, values))
    if not rows:
        raise ValueError(f"no judged pair of {path} lies in the Flickr8k {split} split ({outside} pairs touch other "
                         f"splits); the released judgements cover the test split")
    image_index = torch.tensor([row[0] for row in rows], dtype=torch.int64)
    caption_index = torch.tensor([row[1] for row in rows], dtype=torch.int64)
    common = dict(source=path, split=split, num_images=len(split_ids[split]),
                  captions_per_image=FLICKR8K_CAPTIONS_PER_IMAGE, image_index=image_index,
                  caption_index=caption_index, num_outside_split=outside)
    return common, [row[2] for row in rows]


def _parse_expert_scores(fields: list[str]) -> tuple[int, int, int] | str:
    scores = [_integer(field) for field in fields]
    low, high = EXPERT_SCORE_RANGE
    if any(score is None or not low <= score <= high for score in scores):
        return f"expert scores must be integers {low}-{high}, got {[field.strip() for field in fields]}"
    return tuple(scores)


def _parse_crowd_votes(fields: list[str]) -> tuple[float, int, int] | str:
    yes, no = _integer(fields[1]), _integer(fields[2])
    if yes is None or no is None or yes + no == 0:
        return f"yes and no counts must be non-negative integers, not both 0, got {fields[1].strip()!r}, " \
               f"{fields[2].strip()!r}"
    try:
        printed = float(fields[0])
    except ValueError:
        printed = math.nan
    proportion = yes / (yes + no)
    if not abs(printed - proportion) <= _PROPORTION_TOLERANCE:
        return f"proportion yes {fields[0].strip()!r} disagrees with {yes} yes / {yes + no} votes"
    return proportion, yes, no


def _directory(root: str | os.PathLike | None, split: str, file_name: str) -> Path:
    if split not in FLICKR8K_SPLITS:
        raise ValueError(f"Flickr8k split must be one of {FLICKR8K_SPLITS}, got {split!r}")
    return FLICKR8K_JUDGEMENTS.locate(root, required=(file_name, flickr8k_split_file(split)))


def load_expert_judgements(split: str = "test", root: str | os.PathLike | None = None) -> ExpertJudgements:
    """Flickr8k's expert judgements (``ExpertAnnotations.txt``, Hodosh et al. 2013) of one split's pairs.

    See the module docstring for the indices and the split rule. Raises :class:`DatasetFormatError` naming
    ``file:line`` for a line without 5 fields, a bad caption id, a score outside 1-4, an id in no split file, or a
    pair listed twice; ``ValueError`` when no pair lies in ``split`` (any split but "test").
    """
    common, values = _read_pairs(_directory(root, split, EXPERT_FILE), EXPERT_FILE, split, _parse_expert_scores)
    scores = torch.tensor(values, dtype=torch.int64)                                       # (P, 3)
    return ExpertJudgements(**common, scores=scores, mean_score=scores.sum(dim=1).to(torch.float64) / 3)


def load_crowd_judgements(split: str = "test", root: str | os.PathLike | None = None) -> CrowdJudgements:
    """Flickr8k's CrowdFlower judgements (``CrowdFlowerAnnotations.txt``, Hodosh et al. 2013) of one split's pairs.

    See the module docstring for the indices and the split rule. The yes proportion is recomputed as
    ``yes / (yes + no)`` (so equal fractions compare equal) after checking it against the printed column. Raises
    :class:`DatasetFormatError` naming ``file:line`` for a line without 5 fields, a bad caption id, bad counts, a
    proportion that disagrees with them, an id in no split file, or a pair listed twice; ``ValueError`` when no
    pair lies in ``split``.
    """
    common, values = _read_pairs(_directory(root, split, CROWD_FILE), CROWD_FILE, split, _parse_crowd_votes)
    return CrowdJudgements(**common,
                           yes_proportion=torch.tensor([value[0] for value in values], dtype=torch.float64),
                           yes_count=torch.tensor([value[1] for value in values], dtype=torch.int64),
                           no_count=torch.tensor([value[2] for value in values], dtype=torch.int64))
