"""Category-based retrieval over labelled modalities: the split containers, the seeded splits of Wikipedia and
UCI Multiple Features, and the MAP table with the per-query average precisions behind it.

Shared by DRCL and its baselines (:mod:`xmr.methods.drcl`, :mod:`xmr.methods.cca`). A *direction*
``<query>2<gallery>`` ranks one modality's test items against another's; relevance is "same class"
(:func:`xmr.metrics.average_precisions`). When the modalities of a split are *paired* (row ``i`` of every
modality is the same item: Wikipedia's image-text pairs, UCI's six views of one digit), every direction queries
the same items, so a query item's AP averaged over directions is a per-query value whose mean is the averaged MAP
(``map_all_avg``) exactly; result files store those values (``per_query["query_means"]``). Unpaired modalities
(:func:`xmedia_like_data`) share no items; there every query item of every modality is one unit, weighted so that
the plain mean of the units is the averaged MAP (:func:`pooled_query_units`).
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
    weak_views: tuple[str, ...] = ()  # views whose pairs get their own average (XMedia's audio and 3D, Table VI)

    def __post_init__(self) -> None:
        unknown = set(self.weak_views) - set(self.train)
        if unknown or len(self.weak_views) == 1:
            raise ValueError(f"weak_views must name two or more of the modalities {list(self.train)}, "
                             f"got {self.weak_views}")
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


def unpaired_view_rows(labels: torch.Tensor, views: tuple[str, ...], shares, fractions: tuple[float, float, float],
                       seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """``{part: {view: item indices}}``: a stratified train / validation / test split of the items (``fractions``),
    then every item of every part given to exactly one view, stratified, in proportion to ``shares``. No item is
    in two views or two parts."""
    if len(shares) != len(views) or any(share <= 0 for share in shares):
        raise ValueError(f"shares must be {len(views)} positive numbers, one per view, got {shares}")
    parts = stratified_split(labels, dict(zip(("train", "val", "test"), fractions)), seed)
    total = float(sum(shares))
    return {part: {view: index[rows] for view, rows in
                   stratified_split(labels[index], {v: s / total for v, s in zip(views, shares)}, seed + 1).items()}
            for part, index in parts.items()}


#: The XMedia-like stand-in's views in XMedia's roles (image, text, video, audio, 3D) and their shares of the
#: digits (XMedia: 5000 images and texts, 500 videos, 1000 audio clips and 500 3D models, 10 : 10 : 1 : 2 : 1).
XMEDIA_LIKE_VIEWS = {"pixel": "image", "profile": "text", "karhunen_loeve": "video", "fourier": "audio",
                     "morphological": "3d"}
XMEDIA_LIKE_SHARES = (4.0, 4.0, 2.0, 1.0, 1.0)
XMEDIA_LIKE_WEAK = ("fourier", "morphological")


def xmedia_like_data(root=None, views: tuple[str, ...] = tuple(XMEDIA_LIKE_VIEWS), shares=XMEDIA_LIKE_SHARES,
                     weak_views: tuple[str, ...] = XMEDIA_LIKE_WEAK, noise: float = 1.0,
                     fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0) -> CrossModalData:
    """A harder, XMedia-like variant of UCI Multiple Features: unequal view sizes, no pairing, weaker weak views.

    The 2000 digits are split (stratified, seeded) into train / validation / test as in :func:`uci_mfeat_data`;
    then every digit of every part is given to exactly **one** view, in proportion to ``shares`` within each class,
    so that no item appears in two views (nothing can be paired, as in XMedia, whose media describe different
    items) and the views differ in size (default 4 : 4 : 2 : 1 : 1, about 470 / 470 / 230 / 120 / 110 training
    items). The ``weak_views`` (by default the two weakest UCI views, in XMedia's audio and 3D roles) get Gaussian
    noise of ``noise`` times each feature's standard deviation, so that their pairs are far from UCI's ceiling.
    Features are z-scored with each view's training split; the noise is seeded with ``seed``.
    """
    from .data import load_uci_mfeat

    source = load_uci_mfeat(root)
    owned = unpaired_view_rows(source.labels, views, shares, fractions, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    features = {}
    for view in views:
        values = source.views[view]
        if view in weak_views and noise > 0:
            scale = values[owned["train"][view]].std(0).clamp_min(1e-6)
            values = values + noise * scale * torch.randn(values.shape, generator=generator)
        features[view] = values
    roles = ", ".join(f"{view} ({XMEDIA_LIKE_VIEWS.get(view, 'other')}: "
                      f"{'/'.join(str(len(owned[p][view])) for p in owned)})" for view in views)
    data = CrossModalData(
        **{part: {view: Modality(features[view][rows], source.labels[rows]) for view, rows in chunks.items()}
           for part, chunks in owned.items()},
        num_classes=len(source.class_names),
        description=f"XMedia-like UCI: {len(views)} unpaired views, each digit in one view only, train / "
                    f"validation / test {roles}; noise {noise:g} std on {', '.join(weak_views)} (seed {seed})",
        paired=False,
        weak_views=tuple(weak_views),
    )
    return standardise(data)


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


def pooled_query_units(directions: Mapping[tuple[str, str], torch.Tensor]) -> torch.Tensor:
    """Per-query units of unpaired modalities whose plain mean is the mean of the directions' MAPs.

    With ``D`` directions, ``N_q`` queries of modality ``q``, ``S_q`` its galleries among the directions and
    ``a_qi`` query ``i``'s AP averaged over ``S_q``, the mean MAP is ``(1/D) sum_q (|S_q| / N_q) sum_i a_qi``; the
    unit of query ``(q, i)`` is ``a_qi |S_q| N / (D N_q)`` with ``N = sum_q N_q``, one unit per query item of every
    query modality. (Resampling these units uniformly lets the modalities' counts vary, unlike the fixed test set:
    slightly conservative.)"""
    by_query: dict[str, list[torch.Tensor]] = {}
    for (query, _), values in directions.items():
        by_query.setdefault(query, []).append(values)
    total = sum(len(values[0]) for values in by_query.values())
    units = [torch.stack(values).mean(0) * len(values) * total / (len(directions) * len(values[0]))
             for values in by_query.values()]
    return torch.cat(units)


def _average(directions: Mapping[tuple[str, str], torch.Tensor], paired: bool) -> tuple[float, torch.Tensor]:
    """The mean of the directions' MAPs and its per-query units (per item when paired, else pooled)."""
    value = sum(float(values.mean()) for values in directions.values()) / len(directions)
    units = torch.stack(list(directions.values())).mean(0) if paired else pooled_query_units(directions)
    return value, units


def map_metrics(precisions: Mapping[int | None, Mapping[tuple[str, str], torch.Tensor]],
                paired: bool, weak_views: tuple[str, ...] = ()) -> tuple[dict[str, float], dict]:
    """``(metrics, per_query)`` from the per-query APs of every cut-off ``k`` and direction.

    ``metrics``: ``map_<k>_<query>2<gallery>`` (``k`` = ``all`` or the cut-off), their mean over directions
    ``map_<k>_avg`` (the paper's "Avg") and, with ``weak_views``, the mean over the directions among them
    ``map_<k>_weak_avg`` (Table VI's audio <-> 3D average). ``per_query["query_means"]``: each direction's MAP@all
    list, and every average as one unit per query whose plain mean is that average: for ``paired`` data a query
    item's AP averaged over the directions; for unpaired data :func:`pooled_query_units`.
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
        groups = {"avg": directions}
        weak = {pair: values for pair, values in directions.items() if set(pair) <= set(weak_views)}
        if weak:
            groups["weak_avg"] = weak
        for name, chosen in groups.items():
            metrics[f"map_{tag}_{name}"], units = _average(chosen, paired)
            query_means[f"map_{tag}_{name}"] = rounded(units)
    return metrics, {"query_means": query_means}


def map_evaluation(features: Mapping[str, Modality], ks: tuple[int | None, ...] = (None, 50),
                   paired: bool = False, weak_views: tuple[str, ...] = ()) -> tuple[dict[str, float], dict]:
    """``(metrics, per_query)`` of common-space features (:func:`map_metrics`); ``paired`` and ``weak_views`` as in
    :class:`CrossModalData`."""
    return map_metrics({k: direction_average_precisions(features, k) for k in ks}, paired, weak_views)


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
