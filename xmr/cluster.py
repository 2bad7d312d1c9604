"""Seeded k-means on torch tensors, on their own device: Lloyd's iterations (Lloyd 1982) from k-means++
(Arthur & Vassilvitskii 2007) or random seeding, Euclidean or spherical (cosine), with restarts and warm starts.

CODER's prototype-guided classification (coder2022, Eq. 7; :mod:`xmr.methods.coder`) clusters with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _squared_distances(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Euclidean distances, clamped at 0."""
    return (points.pow(2).sum(1, keepdim=True) - 2 * points @ centroids.T + centroids.pow(2).sum(1)).clamp_min(0)


def _nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid (N,), computed in chunks of points."""
    labels, distances = [], []
    for start in range(0, len(points), chunk):
        best = _squared_distances(points[start:start + chunk], centroids).min(dim=1)
        labels.append(best.indices)
        distances.append(best.values)
    return torch.cat(labels), torch.cat(distances)


def _kmeans_plus_plus(points: torch.Tensor, num_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability ~ D(x)^2."""
    first = torch.randint(len(points), (1,), generator=generator).item()
    centroids = points[first:first + 1]
    closest = _squared_distances(points, centroids)[:, 0]  # (N,)
    for _ in range(1, num_clusters):
        if float(closest.sum()) > 0:
            index = torch.multinomial(closest.cpu().double(), 1, generator=generator).item()
        else:  # every point coincides with a centre: any point will do
            index = torch.randint(len(points), (1,), generator=generator).item()
        centroids = torch.cat([centroids, points[index:index + 1]])
        closest = torch.minimum(closest, _squared_distances(points, points[index:index + 1])[:, 0])
    return centroids


@dataclass
class KMeansResult:
    labels: torch.Tensor  # (N,) cluster of each point
    centroids: torch.Tensor  # (K, D)
    inertia: float  # sum of squared distances to the assigned centroid
    iterations: int


@torch.no_grad()
def kmeans(features: torch.Tensor, num_clusters: int, iterations: int = 20, init: str = "k-means++",
           metric: str = "euclidean", seed: int = 0, restarts: int = 1,
           initial_centroids: torch.Tensor | None = None) -> KMeansResult:
    """Lloyd's k-means on ``features`` (N, D) on their own device, at most ``iterations`` iterations (it stops
    early once no assignment changes).

    ``metric="euclidean"`` is plain k-means (what CODER cites, Jain 2010); ``"cosine"`` L2-normalises the points and the
    centroids (spherical k-means). ``init`` is ``"k-means++"`` or ``"random"`` (K distinct points), both drawn
    from a CPU generator seeded with ``seed``. An empty cluster is re-seeded with the point farthest from its
    centroid. ``restarts`` runs that many initialisations and keeps the lowest inertia (scikit-learn's
    ``n_init``). ``initial_centroids`` (K, D) warm-starts Lloyd's iterations instead (one run): re-clustering
    drifting features from the previous centroids keeps the cluster ids stable.
    """
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    points = features.detach().float()
    if metric == "cosine":
        points = F.normalize(points, dim=1)
    if not 1 <= num_clusters <= len(points):
        raise ValueError(f"num_clusters must be in 1..{len(points)}, got {num_clusters}")
    generator = torch.Generator().manual_seed(seed)
    if initial_centroids is not None:
        if initial_centroids.shape != (num_clusters, points.shape[1]):
            raise ValueError(f"initial_centroids must be ({num_clusters}, {points.shape[1]}), "
                             f"got {tuple(initial_centroids.shape)}")
        return _lloyd(points, num_clusters, iterations, init, metric, generator, initial_centroids)
    runs = [_lloyd(points, num_clusters, iterations, init, metric, generator) for _ in range(restarts)]
    return min(runs, key=lambda run: run.inertia)


def _lloyd(points: torch.Tensor, num_clusters: int, iterations: int, init: str, metric: str,
           generator: torch.Generator, initial_centroids: torch.Tensor | None = None) -> KMeansResult:
    if initial_centroids is not None:
        centroids = initial_centroids.detach().to(points.device, points.dtype).clone()
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=1)
    elif init == "random":
        centroids = points[torch.randperm(len(points), generator=generator)[:num_clusters].to(points.device)]
    else:
        centroids = _kmeans_plus_plus(points, num_clusters, generator)
    labels, distances = _nearest(points, centroids)
    done = 0
    for done in range(1, iterations + 1):
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)  # (K, D)
        counts = torch.bincount(labels, minlength=num_clusters).to(points.dtype)  # (K,)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        for cluster in torch.nonzero(counts == 0).flatten().tolist():
            farthest = int(distances.argmax())
            centroids[cluster] = points[farthest]
            distances[farthest] = 0
        if metric == "cosine":
            centroids = F.normalize(centroids, dim=1)
        new_labels, distances = _nearest(points, centroids)
        changed = bool((new_labels != labels).any())
        labels = new_labels
        if not changed:
            break
    return KMeansResult(labels, centroids, float(distances.sum()), done)
