"""Category-based retrieval over labelled modalities: the split containers, the seeded splits of Wikipedia and
UCI Multiple Features, and the MAP table with the per-query average precisions behind it.

Shared by DRCL and its baselines (:mod:`xmr.methods.drcl`, :mod:`xmr.methods.cca`). A *direction*
``<query>2<gallery>`` ranks one modality's test items against another's; relevance is "same class"
(:func:`xmr.metrics.average_precisions`). When the modalities of a split are *paired* (row ``i`` of every
modality is the same item: Wikipedia's image-text pairs, UCI's six views of one digit), every direction queries
the same items, so a query item's AP averaged over directions is a per-query value whose mean is the averaged MAP
(``map_all_avg``) exactly; result files store those values (``per_query["query_means"]``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .metrics import average_precisions, precision_recall_curve
from .results import closed_form_training

PER_QUERY_DIGITS = 6  # per-query APs are rounded to this many decimals in result files


@dataclass(frozen=True)
class Modality:
    """The samples of one modality in one split: features (N, D) and class labels (N,). Modalities of a split
    need not be paired or of equal size.

    It is also the training set :func:`xmr.train.fit` reads: ``modality[indices]`` is the batch
    ``{"features": (B, D), "labels": (B,)}``, fetched whole (``fetches_batches``), not collated row by row."""

    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor    # (N,) int64, 0 ... C-1
    fetches_batches: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.features.dim() != 2 or self.labels.dim() != 1 or len(self.features) != len(self.labels):
            raise ValueError(f"features (N, D) and labels (N,) disagree: {tuple(self.features.shape)} vs "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "labels": self.labels[index]}


@dataclass(frozen=True)
class CrossModalData:
    """Train / validation / test samples of every modality, and the number of classes. ``paired``: row ``i`` of
    every modality of a split is the same item (checked: equal sizes and labels)."""

    train: dict[str, Modality]
    val: dict[str, Modality]
    test: dict[str, Modality]
    num_classes: int
    description: str = ""
    paired: bool = False

    def __post_init__(self) -> None:
        if not self.paired:
            return
        for part in ("train", "val", "test"):
            split = getattr(self, part)
            first = next(iter(split.values())).labels
            if any(not torch.equal(modality.labels, first) for modality in split.values()):
                raise ValueError(f"paired=True, but the {part} modalities differ in size or labels")

    @property
    def modalities(self) -> list[str]:
        return list(self.train)

    def sizes(self) -> dict[str, dict[str, int]]:
        return {name: {"train": len(self.train[name]), "val": len(self.val[name]), "test": len(self.test[name]),
                       "dim": self.train[name].features.shape[1]} for name in self.modalities}


def stratified_split(labels: torch.Tensor, sizes: Mapping[str, float], seed: int = 0) -> dict[str, torch.Tensor]:
    """Disjoint index sets with the class proportions of ``labels``: ``sizes`` maps a part name to its fraction
    of every class (the fractions sum to 1; rounding goes to the last part). Seeded, so the split is fixed."""
    if abs(sum(sizes.values()) - 1.0) > 1e-9:
        raise ValueError(f"the fractions must sum to 1, got {dict(sizes)}")
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    names = list(sizes)
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        start = 0
        for position, name in enumerate(names):
            count = len(members) - start if position == len(names) - 1 else round(sizes[name] * len(members))
            parts[name].append(members[start:start + count])
            start += count
    return {name: torch.sort(torch.cat(chunks)).values for name, chunks in parts.items()}


def standardise(data: CrossModalData) -> CrossModalData:
    """z-score every feature with the training split's mean and standard deviation (per modality)."""
    parts: dict[str, dict[str, Modality]] = {"train": {}, "val": {}, "test": {}}
    for name in data.modalities:
        features = data.train[name].features
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        for part in parts:
            modality = getattr(data, part)[name]
            parts[part][name] = Modality((modality.features - mean) / std, modality.labels)
    return dataclasses.replace(data, **parts)


def wikipedia_data(root=None, val_fraction: float = 1 / 3, seed: int = 0, scale: bool = True) -> CrossModalData:
    """Wikipedia (SIFT 128-d images, LDA 10-d texts): the standard 2173 training pairs; the 693 test pairs split,
    stratified and seeded, into validation and test as the paper does (231 / 462 at ``val_fraction = 1/3``)."""
    from .data import load_wikipedia

    train, test = load_wikipedia("train", root), load_wikipedia("test", root)
    parts = stratified_split(test.labels, {"val": val_fraction, "test": 1 - val_fraction}, seed)
    data = CrossModalData(
        train={view: Modality(train.views[view], train.labels) for view in train.views},
        val={view: Modality(test.views[view][parts["val"]], test.labels[parts["val"]]) for view in test.views},
        test={view: Modality(test.views[view][parts["test"]], test.labels[parts["test"]]) for view in test.views},
        num_classes=len(train.class_names),
        description=f"Wikipedia SIFT/LDA: 2173 train; the 693 test pairs split {len(parts['val'])} validation / "
                    f"{len(parts['test'])} test (stratified, seed {seed})",
        paired=True,
    )
    return standardise(data) if scale else data


def uci_mfeat_data(root=None, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0,
                   scale: bool = True) -> CrossModalData:
    """UCI Multiple Features (6 views of 2000 digits): a seeded stratified train / validation / test split (the
    dataset has no official split)."""
    from .data import load_uci_mfeat

    views = load_uci_mfeat(root)
    parts = stratified_split(views.labels, dict(zip(("train", "val", "test"), fractions)), seed)
    data = CrossModalData(
        **{part: {view: Modality(views.views[view][index], views.labels[index]) for view in views.views}
           for part, index in parts.items()},
        num_classes=len(views.class_names),
        description=f"UCI multiple features, 6 views: seeded stratified split {len(parts['train'])} / "
                    f"{len(parts['val'])} / {len(parts['test'])} (seed {seed})",
        paired=True,
    )
    return standardise(data) if scale else data


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: MAP of every direction, per query
# ---------------------------------------------------------------------------------------------------------------


def direction_average_precisions(features: Mapping[str, Modality],
                                 k: int | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """Every query's AP@k (AP@all for ``k=None``) in every ordered modality pair (query modality, gallery
    modality): float64 (N_query,) tensors."""
    return {(query, gallery): average_precisions(features[query].features, features[query].labels,
                                                 features[gallery].features, features[gallery].labels, k=k)
            for query in features for gallery in features if query != gallery}


def map_metrics(precisions: Mapping[int | None, Mapping[tuple[str, str], torch.Tensor]],
                paired: bool) -> tuple[dict[str, float], dict]:
    """``(metrics, per_query)`` from the per-query APs of every cut-off ``k`` and direction.

    ``metrics``: ``map_<k>_<query>2<gallery>`` (``k`` = ``all`` or the cut-off) and their mean over directions
    ``map_<k>_avg`` (the paper's "Avg"). ``per_query["query_means"]``: each direction's MAP@all list and, for
    ``paired`` data, each ``map_<k>_avg`` as one value per query item (its AP averaged over the directions, whose
    mean is ``map_<k>_avg``). Unpaired modalities share no query items, so they get the per-direction lists only.
    """
    metrics: dict[str, float] = {}
    query_means: dict[str, list[float]] = {}

    def rounded(values: torch.Tensor) -> list[float]:
        return [round(value, PER_QUERY_DIGITS) for value in values.tolist()]

    for k, directions in precisions.items():
        tag = "all" if k is None else str(k)
        for (query, gallery), values in directions.items():
            metrics[f"map_{tag}_{query}2{gallery}"] = float(values.mean())
            if k is None:
                query_means[f"map_{tag}_{query}2{gallery}"] = rounded(values)
        metrics[f"map_{tag}_avg"] = sum(float(values.mean()) for values in directions.values()) / len(directions)
        if paired:
            query_means[f"map_{tag}_avg"] = rounded(torch.stack(list(directions.values())).mean(0))
    return metrics, {"query_means": query_means}


def map_evaluation(features: Mapping[str, Modality], ks: tuple[int | None, ...] = (None, 50),
                   paired: bool = False) -> tuple[dict[str, float], dict]:
    """``(metrics, per_query)`` of common-space features (:func:`map_metrics`); ``paired`` as in
    :class:`CrossModalData`."""
    return map_metrics({k: direction_average_precisions(features, k) for k in ks}, paired)


def map_table(features: Mapping[str, Modality], ks: tuple[int | None, ...] = (None, 50)) -> dict[str, float]:
    """Flat metrics of a run: ``map_all_<query>2<gallery>``, ``map_50_...`` for every ordered pair and their
    averages ``map_all_avg``, ``map_50_avg`` (the paper's "Avg": the mean over ordered pairs)."""
    return map_evaluation(features, ks)[0]


def evaluate_features(features: Mapping[str, Modality], paired: bool = True) -> dict:
    """MAP@all / MAP@50 of fixed features (e.g. a paper's released ones) as the ``metrics``, ``per_query`` and
    ``training`` arguments of :func:`xmr.results.write_result`: a closed-form evaluation, nothing is trained."""
    started = time.perf_counter()
    metrics, per_query = map_evaluation(features, paired=paired)
    return {"metrics": metrics, "per_query": per_query, "training": closed_form_training(time.perf_counter() - started)}


def pr_curves(features: Mapping[str, Modality], num_points: int = 11) -> dict[str, list[float]]:
    """Interpolated precision-recall curves (Fig. 2) of every ordered pair, keyed ``<query>2<gallery>``."""
    curves = {}
    for query in features:
        for gallery in features:
            if query != gallery:
                _, precision = precision_recall_curve(features[query].features, features[query].labels,
                                                      features[gallery].features, features[gallery].labels,
                                                      num_points)
                curves[f"{query}2{gallery}"] = precision.tolist()
    return curves
