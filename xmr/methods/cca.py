"""CCA and multi-set CCA: the classical, unsupervised (label-free) line of DRCL's comparison.

Both are closed-form and regularised, in float64 torch, rather than scikit-learn's ``CCA``: that one is the
iterative NIPALS algorithm of the PLS family (one component at a time, a convergence tolerance, no ridge), which
is slower and only approximately the CCA solution, while the eigen-decompositions below are exact and take
milliseconds for these feature sizes.

- :func:`fit_cca` (Hotelling 1936): ``W_x = C_xx^{-1/2} U``, ``W_y = C_yy^{-1/2} V`` with
  ``U S V^T = svd(C_xx^{-1/2} C_xy C_yy^{-1/2})``; ``S`` are the canonical correlations.
- :func:`fit_mcca` (multi-set CCA, the SUMCOR relaxation as in Nielsen 2002, DRCL's "MCCA" baseline): the top
  generalised eigenvectors of ``C w = rho D w`` with ``C`` the covariance of all views stacked and ``D`` its
  block diagonal. With two views the eigenvalues are ``1 +- rho`` and the eigenvectors are CCA's directions.

Every covariance gets a ridge of ``reg`` times its mean eigenvalue. Retrieval uses the cosine between projected
(centred) features, like every other method here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import scipy.linalg
import torch

from ..category_retrieval import (
    CrossModalData,
    Modality,
    direction_average_precisions,
    map_evaluation,
    map_metrics,
    map_table,
    pr_curves,
)
from ..results import closed_form_training


@dataclass(frozen=True)
class LinearProjection:
    """``x -> (x - mean) @ weights``: a view's map into the common space, (D,) and (D, k) in float64."""

    mean: torch.Tensor
    weights: torch.Tensor

    def __call__(self, features: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        weights = self.weights if dim is None else self.weights[:, :dim]
        return ((features.double() - self.mean) @ weights).float()


def _centred(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    mean = features.mean(0)
    return features - mean, mean


def _ridge(covariance: torch.Tensor, reg: float) -> torch.Tensor:
    scale = torch.trace(covariance) / covariance.shape[0]
    return covariance + reg * scale * torch.eye(covariance.shape[0], dtype=covariance.dtype)


def _inverse_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T


def fit_cca(x: torch.Tensor, y: torch.Tensor, dim: int | None = None,
            reg: float = 1e-3) -> tuple[LinearProjection, LinearProjection, torch.Tensor]:
    """Regularised CCA of paired rows ``x`` (N, Dx) and ``y`` (N, Dy); ``dim`` directions (default all,
    ``min(Dx, Dy)``). Returns the two projections and the canonical correlations (descending)."""
    if len(x) != len(y):
        raise ValueError(f"CCA needs paired rows: {len(x)} vs {len(y)}")
    x, mean_x = _centred(x)
    y, mean_y = _centred(y)
    n = len(x) - 1
    root_x = _inverse_sqrt(_ridge(x.T @ x / n, reg))                           # (Dx, Dx)
    root_y = _inverse_sqrt(_ridge(y.T @ y / n, reg))                           # (Dy, Dy)
    u, correlations, vh = torch.linalg.svd(root_x @ (x.T @ y / n) @ root_y, full_matrices=False)
    dim = min(x.shape[1], y.shape[1]) if dim is None else min(dim, x.shape[1], y.shape[1])
    return (LinearProjection(mean_x, root_x @ u[:, :dim]), LinearProjection(mean_y, root_y @ vh.T[:, :dim]),
            correlations[:dim])


def fit_mcca(views: Mapping[str, torch.Tensor], dim: int | None = None,
             reg: float = 1e-3) -> tuple[dict[str, LinearProjection], torch.Tensor]:
    """Multi-set CCA (SUMCOR relaxation) of paired views: ``dim`` common directions (default the smallest view
    width). Returns a projection per view and the generalised eigenvalues (descending; ``1 + rho`` for 2 views)."""
    names = list(views)
    centred = {name: _centred(views[name]) for name in names}
    if len({len(centred[name][0]) for name in names}) != 1:
        raise ValueError("multi-set CCA needs paired rows in every view")
    stacked = torch.cat([centred[name][0] for name in names], dim=1)           # (N, sum D_k)
    covariance = stacked.T @ stacked / (len(stacked) - 1)
    widths = [views[name].shape[1] for name in names]
    bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
    blocks = [_ridge(covariance[a:b, a:b], reg) for a, b in zip(bounds[:-1], bounds[1:])]
    full = covariance.clone()
    for (a, b), block in zip(zip(bounds[:-1], bounds[1:]), blocks):
        full[a:b, a:b] = block
    diagonal = torch.block_diag(*blocks)
    dim = min(widths) if dim is None else min(dim, sum(widths))
    values, vectors = scipy.linalg.eigh(full.numpy(), diagonal.numpy())
    order = values.argsort()[::-1][:dim].copy()
    vectors = torch.from_numpy(vectors[:, order])                               # (sum D_k, dim)
    projections = {name: LinearProjection(centred[name][1], vectors[a:b])
                   for name, a, b in zip(names, bounds[:-1], bounds[1:])}
    return projections, torch.from_numpy(values[order].copy())


def _project(split: Mapping[str, Modality], projections: Mapping[str, LinearProjection],
             dim: int) -> dict[str, Modality]:
    return {name: Modality(projections[name](split[name].features, dim), split[name].labels) for name in projections}


def _best_dim(data: CrossModalData, projections: Mapping[str, LinearProjection], candidates: Sequence[int]) -> int:
    scores = {dim: map_table(_project(data.val, projections, dim), ks=(None,))["map_all_avg"] for dim in candidates}
    return max(scores, key=scores.get)


def _candidates(max_dim: int, dims: Sequence[int] | None) -> list[int]:
    if dims is None:
        dims = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_dim})
    return [dim for dim in dims if dim <= max_dim] or [max_dim]


def _require_pairs(data: CrossModalData) -> None:
    if not data.paired:
        raise ValueError("CCA learns from paired rows; these modalities are unpaired (CrossModalData.paired=False), "
                         "so CCA and multi-set CCA cannot be fitted on them")


@dataclass
class CCAResult:
    """Test metrics (:func:`xmr.category_retrieval.map_table` keys), the per-query APs behind them, and the
    projections, chosen dimension and projected test features of every fit: one entry per modality pair for
    pairwise CCA, one entry (all modalities) for multi-set CCA."""

    metrics: dict[str, float]
    per_query: dict
    test_features: dict[tuple[str, ...], dict[str, Modality]]
    dims: dict[tuple[str, ...], int]
    projections: dict[tuple[str, ...], dict[str, LinearProjection]]
    wall_time_s: float

    def result_fields(self) -> dict:
        """The ``metrics``, ``per_query``, ``training`` (closed form: no seed variance) and ``extra`` (the chosen
        dimensions, the test precision-recall curves of every ordered pair) arguments of
        :func:`xmr.results.write_result`."""
        curves: dict[str, list[float]] = {}
        for features in self.test_features.values():
            curves.update(pr_curves(features))
        return {"metrics": self.metrics, "per_query": self.per_query,
                "training": closed_form_training(self.wall_time_s),
                "extra": {"dims": {"-".join(key): dim for key, dim in self.dims.items()}, "pr_curves": curves}}


def run_cca(data: CrossModalData, reg: float = 1e-3, dims: Sequence[int] | None = None) -> CCAResult:
    """Pairwise CCA: one CCA per pair of modalities on their (paired) training rows, its dimension chosen on the
    validation split from ``dims``; test MAP@all and MAP@50 of both directions (``map_all_avg`` is the mean over
    all ordered pairs)."""
    _require_pairs(data)
    started = time.perf_counter()
    features, chosen, fitted = {}, {}, {}
    precisions: dict[int | None, dict] = {None: {}, 50: {}}
    for first, second in combinations(data.modalities, 2):
        pair = CrossModalData({n: data.train[n] for n in (first, second)}, {n: data.val[n] for n in (first, second)},
                              {n: data.test[n] for n in (first, second)}, data.num_classes, paired=data.paired)
        proj_first, proj_second, _ = fit_cca(data.train[first].features, data.train[second].features, reg=reg)
        projections = {first: proj_first, second: proj_second}
        dim = _best_dim(pair, projections, _candidates(proj_first.weights.shape[1], dims))
        features[first, second], chosen[first, second] = _project(pair.test, projections, dim), dim
        fitted[first, second] = projections
        for k, directions in precisions.items():
            directions.update(direction_average_precisions(features[first, second], k))
    metrics, per_query = map_metrics(precisions, data.paired, data.weak_views)
    return CCAResult(metrics, per_query, features, chosen, fitted, time.perf_counter() - started)


def run_mcca(data: CrossModalData, reg: float = 1e-3, dims: Sequence[int] | None = None) -> CCAResult:
    """Multi-set CCA of all modalities at once (one common space), dimension chosen on the validation split."""
    _require_pairs(data)
    started = time.perf_counter()
    projections, _ = fit_mcca({name: data.train[name].features for name in data.modalities}, reg=reg,
                              dim=sum(data.train[name].features.shape[1] for name in data.modalities))
    dim = _best_dim(data, projections, _candidates(next(iter(projections.values())).weights.shape[1], dims))
    features = _project(data.test, projections, dim)
    key = tuple(data.modalities)
    metrics, per_query = map_evaluation(features, paired=data.paired, weak_views=data.weak_views)
    return CCAResult(metrics, per_query, {key: features}, {key: dim}, {key: projections},
                     time.perf_counter() - started)
