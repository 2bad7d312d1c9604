"""k-means (xmr.cluster, used by CODER's PGC, coder2022 Eq. 7): scikit-learn's partition and inertia, seeding,
cosine, duplicates and warm starts."""
import pytest
import torch

from xmr.cluster import kmeans


def _blobs(generator, per_cluster=40, num_clusters=5, dim=6):
    centres = torch.randn(num_clusters, dim, generator=generator) * 10
    points = centres.repeat_interleave(per_cluster, 0) + 0.3 * torch.randn(per_cluster * num_clusters, dim,
                                                                           generator=generator)
    order = torch.randperm(len(points), generator=generator)
    return points[order], torch.arange(num_clusters).repeat_interleave(per_cluster)[order]


def _same_partition(a: torch.Tensor, b) -> bool:
    """True when two labelings agree up to a relabeling (a bijection between cluster ids)."""
    pairs = set(zip(a.tolist(), list(b)))
    return len(pairs) == len(set(a.tolist())) == len(set(list(b)))


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_agrees_with_scikit_learn(generator, init):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    points, truth = _blobs(generator)
    ours = kmeans(points, 5, iterations=50, init=init, seed=1, restarts=1 if init == "k-means++" else 10)
    theirs = sklearn_cluster.KMeans(n_clusters=5, n_init=10, random_state=0).fit(points.numpy())
    assert _same_partition(ours.labels, theirs.labels_.tolist())
    assert _same_partition(ours.labels, truth.tolist())
    assert ours.inertia == pytest.approx(float(theirs.inertia_), rel=1e-4)
    assert ours.centroids.shape == (5, 6) and ours.labels.shape == (200,)


def test_kmeans_is_seeded_and_handles_cosine_and_duplicates(generator):
    points, truth = _blobs(generator)
    first, second = kmeans(points, 5, seed=3), kmeans(points, 5, seed=3)
    assert torch.equal(first.labels, second.labels)
    directions = torch.cat([torch.randn(1, 6, generator=generator) * s for s in (1, 5)]).repeat(30, 1)
    spherical = kmeans(directions + 1e-3 * torch.randn(60, 6, generator=generator), 1, metric="cosine")
    assert spherical.labels.unique().numel() == 1  # one direction at two scales: one cluster under cosine
    same = torch.ones(10, 3)  # all points equal, more clusters than distinct points: no crash, no NaN
    result = kmeans(same, 3)
    assert bool(torch.isfinite(result.centroids).all()) and result.inertia == 0


def test_kmeans_warm_start_keeps_cluster_ids(generator):
    points, _ = _blobs(generator)
    first = kmeans(points, 5, seed=0)
    moved = points + 0.05 * torch.randn(points.shape, generator=generator)  # features drift a little
    again = kmeans(moved, 5, initial_centroids=first.centroids)
    assert torch.equal(again.labels, first.labels)  # same ids, not only the same partition
    with pytest.raises(ValueError):
        kmeans(points, 4, initial_centroids=first.centroids)


def test_kmeans_keeps_the_best_restart_and_rejects_bad_options(generator):
    points, _ = _blobs(generator)
    runs = [kmeans(points, 5, iterations=2, init="random", seed=seed) for seed in range(3)]
    best = kmeans(points, 5, iterations=2, init="random", seed=0, restarts=3)  # one generator for all restarts
    assert best.inertia <= runs[0].inertia
    for options in ({"metric": "manhattan"}, {"init": "forgy"}, {"restarts": 0}):
        with pytest.raises(ValueError, match=next(iter(options))):
            kmeans(points, 5, **options)
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(points, len(points) + 1)
