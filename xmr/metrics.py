"""Evaluation protocols: caption retrieval (R@K, MedR, MeanR, Rsum) and category retrieval (MAP, PR curves).

Caption retrieval (VSE++ convention)
------------------------------------
``sims`` is an ``(N_images, N_images * captions_per_image)`` similarity matrix with captions in image-major
order: caption ``j`` belongs to image ``j // captions_per_image``.

- Image-to-text (i2t): each image ranks all captions; the image's rank is the rank of its best-ranked
  ground-truth caption. Text-to-image (t2i): each caption ranks all images; its rank is the rank of its image.
- Ranks are 0-based. ``R@K = 100 * fraction of queries with rank < K``;
  ``MedR = floor(median(rank)) + 1`` with numpy's median (mean of the two middle values for an even count),
  exactly VSE++'s ``np.floor(np.median(ranks)) + 1``; ``MeanR = mean(rank) + 1``;
  ``rsum = i2t R@1 + R@5 + R@10 + t2i R@1 + R@5 + R@10``.
- **Tie rule (pessimistic).** A query's rank is the worst 0-based position that its first ground-truth item
  could take under any ordering of equal scores: the number of non-ground-truth gallery items whose similarity
  is greater than or equal to the query's best ground-truth similarity. Other ground-truth items never count
  against a query. With one ground truth per query (t2i, or ``captions_per_image=1``) this reads: the number of
  gallery items, other than the positive itself, with similarity >= the positive's. Without ties the rank is
  exactly VSE++'s (the position of the best ground truth in a descending sort); with ties VSE++'s rank depends
  on numpy's unstable argsort, ours is the worst case, so a degenerate model (all scores equal) gets the worst
  rank rather than a lucky one.
- Ranks are counted with comparisons against the ground-truth scores, never with a full argsort; rows of
  ``sims`` are processed ``chunk_size`` images at a time, so the extra memory is
  O(chunk_size * N_captions) and everything stays on the tensor's device until the final scalars.
- COCO "1K": :func:`retrieval_metrics_5fold` averages every metric over the diagonal blocks of 1000 images and
  computes rsum from the averaged recalls.
- shi2024's Eq. (5) defines R@K as the fraction of a query's relevant items in its top K, which differs from
  the hit rate above for i2t (5 relevant captions): :func:`relevant_fraction_recall`.

Category retrieval (DRCL and its baselines)
-------------------------------------------
Similarity is cosine (both sides L2-normalised), relevance is "same class label". Each query's gallery is sorted
by descending similarity with a **stable** sort, so equal similarities keep gallery-index order. (The authors'
``fx_calc_map_label`` sorts scipy ``cdist(..., 'cosine')`` distances with numpy's default, unstable quicksort;
on the DRCL Wikipedia features the two orders differ by 3e-5 in MAP.) Then, for a cut-off ``k``,
``AP = (1 / R_k) * sum_{r <= k} P@r * rel(r)`` with ``R_k`` the number of relevant items in the top ``k`` and
``AP = 0`` when there is none; MAP is the mean AP over queries (MAP@all: ``k`` = gallery size).

Within the text or the joint space (shi2024, icone2024)
-------------------------------------------------------
:func:`caption_retrieval_metrics`: each caption queries all the others, the other captions of its image being
the relevant ones (ties pessimistic, as above). :func:`joint_space_silhouette`: how tightly each image and its
captions cluster in a joint space.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
                  "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum")
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
RECALL_CUTOFFS = (1, 5, 10)


# ---------------------------------------------------------------------------------------------------------------
# Caption retrieval
# ---------------------------------------------------------------------------------------------------------------

def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_sims(sims: torch.Tensor, captions_per_image: int) -> None:
    _check_positive_int(captions_per_image, "captions_per_image")
    if not isinstance(sims, torch.Tensor):
        raise ValueError(f"sims must be a torch.Tensor, got {type(sims).__name__}")
    if sims.dim() != 2:
        raise ValueError(f"sims must be 2-D (N_images, N_images * captions_per_image), got shape {tuple(sims.shape)}")
    if sims.is_complex() or sims.dtype == torch.bool:
        raise ValueError(f"sims must hold real numbers, got dtype {sims.dtype}")
    n_images, n_captions = sims.shape
    if n_images == 0:
        raise ValueError("sims is empty: there are no images to evaluate")
    if n_captions != n_images * captions_per_image:
        raise ValueError(f"sims has shape {tuple(sims.shape)}, but {n_images} images with {captions_per_image} "
                         f"captions each need {n_images * captions_per_image} columns (captions image-major: "
                         f"caption j belongs to image j // captions_per_image)")


def retrieval_ranks(sims: torch.Tensor, captions_per_image: int = 5,
                    chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks of every query under the pessimistic tie rule of this module's docstring.

    Returns ``(i2t_ranks, t2i_ranks)``: int64 tensors of lengths N_images and N_captions, on ``sims``' device.
    Raises ``ValueError`` for a matrix that is not 2-D, whose width is not ``N_images * captions_per_image``, or
    that holds a NaN or an infinity.
    """
    _check_sims(sims, captions_per_image)
    _check_positive_int(chunk_size, "chunk_size")
    n_images, n_captions = sims.shape
    device = sims.device
    caption_ids = torch.arange(n_captions, device=device)
    caption_positive = sims[caption_ids // captions_per_image, caption_ids]               # (N_captions,)
    offsets = torch.arange(captions_per_image, device=device)
    i2t_ranks = torch.empty(n_images, dtype=torch.int64, device=device)
    t2i_at_or_above = torch.zeros(n_captions, dtype=torch.int64, device=device)
    for start in range(0, n_images, chunk_size):
        block = sims[start:start + chunk_size]                                             # (c, N_captions)
        if not bool(torch.isfinite(block).all()):
            raise ValueError("sims holds NaN or infinite values; ranks would be meaningless")
        rows = torch.arange(block.shape[0], device=device)
        positive_columns = (start + rows)[:, None] * captions_per_image + offsets          # (c, cpi)
        positives = block[rows[:, None], positive_columns]                                # (c, cpi)
        best = positives.amax(dim=1, keepdim=True)                                        # (c, 1)
        # every caption scoring >= the best positive, minus the positives among them (at least the best one)
        i2t_ranks[start:start + block.shape[0]] = ((block >= best).sum(dim=1)
                                                   - (positives >= best).sum(dim=1))
        # for each caption, the images in this block scoring >= its own image (its own image included)
        t2i_at_or_above += (block >= caption_positive).sum(dim=0)
    return i2t_ranks, t2i_at_or_above - 1


def _summarise_ranks(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    count = ranks.numel()
    metrics = {f"{prefix}_r{k}": 100.0 * int((ranks < k).sum()) / count for k in RECALL_CUTOFFS}
    ordered = torch.sort(ranks).values
    lower, upper = int(ordered[(count - 1) // 2]), int(ordered[count // 2])
    metrics[f"{prefix}_medr"] = float((lower + upper) // 2 + 1)   # floor of numpy's median of integers, plus 1
    metrics[f"{prefix}_meanr"] = int(ranks.sum()) / count + 1.0
    return metrics


def metrics_from_ranks(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor) -> dict[str, float]:
    """R@1/5/10, MedR, MeanR per direction and rsum from the 0-based ranks of :func:`retrieval_ranks`."""
    metrics = {**_summarise_ranks(torch.as_tensor(i2t_ranks), "i2t"),
               **_summarise_ranks(torch.as_tensor(t2i_ranks), "t2i")}
    metrics["rsum"] = sum(metrics[key] for key in RECALL_KEYS)
    return {key: metrics[key] for key in RETRIEVAL_KEYS}


def retrieval_metrics(sims: torch.Tensor, captions_per_image: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """Image-to-text and text-to-image R@1/5/10, MedR, MeanR and rsum of a similarity matrix (VSE++ protocol).

    ``sims`` is ``(N_images, N_images * captions_per_image)`` with captions image-major. Ties are ranked
    pessimistically (see the module docstring). Rows are processed ``chunk_size`` at a time, so a 5000 x 25000
    matrix needs only a few hundred MB beyond itself; the work runs on ``sims``' device.
    """
    return metrics_from_ranks(*retrieval_ranks(sims, captions_per_image, chunk_size))


def retrieval_evaluation(sims: torch.Tensor, captions_per_image: int = 5,
                         chunk_size: int = 1024) -> tuple[dict[str, float], dict]:
    """``(metrics, per_query)``: :func:`retrieval_metrics` and the ranks they come from, as a result file stores
    them (``{"caption_ranks": {"captions_per_image", "i2t", "t2i"}}``), so a claim can be re-judged per query."""
    i2t_ranks, t2i_ranks = retrieval_ranks(sims, captions_per_image, chunk_size)
    per_query = {"caption_ranks": {"captions_per_image": captions_per_image,
                                   "i2t": i2t_ranks.cpu().tolist(), "t2i": t2i_ranks.cpu().tolist()}}
    return metrics_from_ranks(i2t_ranks, t2i_ranks), per_query


def retrieval_metrics_5fold(sims: torch.Tensor, captions_per_image: int = 5, fold_size: int = 1000,
                            chunk_size: int = 1024) -> dict[str, float]:
    """COCO "1K" protocol: every metric averaged over the ``N_images // fold_size`` diagonal blocks.

    Fold ``f`` is images ``f * fold_size ... (f + 1) * fold_size - 1`` against their own captions (5 folds for
    the 5000-image COCO test set). Recalls, MedR and MeanR are averaged over folds, and ``rsum`` is the sum of the
    six averaged recalls (equal to the mean of the per-fold rsums). Note: the VSE++ and SCAN scripts print
    ``mean_metrics[10] * 6`` as "rsum", where index 10 is the mean *i2t* average recall, so their printed 1K
    "rsum" is 2 x (i2t R@1 + R@5 + R@10) and ignores t2i; do not compare our rsum with such a number.
    """
    _check_sims(sims, captions_per_image)
    _check_positive_int(fold_size, "fold_size")
    n_images = sims.shape[0]
    if n_images % fold_size != 0:
        raise ValueError(f"{n_images} images cannot be split into folds of {fold_size} images")
    n_folds = n_images // fold_size
    folds = []
    for fold in range(n_folds):
        images = slice(fold * fold_size, (fold + 1) * fold_size)
        captions = slice(fold * fold_size * captions_per_image, (fold + 1) * fold_size * captions_per_image)
        folds.append(retrieval_metrics(sims[images, captions], captions_per_image, chunk_size))
    metrics = {key: sum(fold[key] for fold in folds) / n_folds for key in RETRIEVAL_KEYS if key != "rsum"}
    metrics["rsum"] = sum(metrics[key] for key in RECALL_KEYS)
    return {key: metrics[key] for key in RETRIEVAL_KEYS}


def relevant_fraction_per_image(sims: torch.Tensor, captions_per_image: int = 5, cutoffs=RECALL_CUTOFFS,
                                chunk_size: int = 256) -> dict[str, torch.Tensor]:
    """Per-image recall as shi2024's Eq. (5) prints it: relevant items in the top k / all relevant items.

    Returns ``i2t_r{k}`` and ``t2i_r{k}`` as (N_images,) float64 tensors in percent on the CPU: for i2t the
    share of the image's own captions in its top k; for t2i the mean over the image's captions of "its image is
    in the top k" (one relevant item, so Eq. (5) is the hit rate of :func:`retrieval_metrics`). Ties are
    pessimistic as in :func:`retrieval_ranks`: the m-th best (0-based) own caption sits at position m plus the
    number of other captions scoring at least as high. The mean over images of each entry is the metric.
    """
    _check_sims(sims, captions_per_image)
    _check_positive_int(chunk_size, "chunk_size")
    n_images, n_captions = sims.shape
    device = sims.device
    offsets = torch.arange(captions_per_image, device=device)
    cutoffs = tuple(cutoffs)
    i2t = {k: [] for k in cutoffs}
    for start in range(0, n_images, chunk_size):
        block = sims[start:start + chunk_size]                                             # (c, N_captions)
        if not bool(torch.isfinite(block).all()):
            raise ValueError("sims holds NaN or infinite values; ranks would be meaningless")
        rows = torch.arange(block.shape[0], device=device)
        own = (start + rows)[:, None] * captions_per_image + offsets                       # (c, cpi)
        positives = block[rows[:, None], own].sort(dim=1, descending=True).values          # (c, cpi)
        is_own = torch.zeros_like(block, dtype=torch.bool)
        is_own[rows[:, None], own] = True
        others = torch.where(is_own, torch.full_like(block, -torch.inf), block)            # (c, N_captions)
        at_or_above = (others[:, None, :] >= positives[:, :, None]).sum(dim=2)             # (c, cpi)
        positions = at_or_above + offsets                                                  # (c, cpi)
        for k in cutoffs:
            i2t[k].append(100.0 * (positions < k).double().mean(dim=1).cpu())
    _, t2i_ranks = retrieval_ranks(sims, captions_per_image)
    t2i_ranks = t2i_ranks.reshape(n_images, captions_per_image).cpu()
    units = {f"i2t_r{k}": torch.cat(values) for k, values in i2t.items()}
    units.update({f"t2i_r{k}": 100.0 * (t2i_ranks < k).double().mean(dim=1) for k in cutoffs})
    return units


def relevant_fraction_recall(sims: torch.Tensor, captions_per_image: int = 5,
                             chunk_size: int = 256) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``(metrics, query_means)``: shi2024's Eq. (5) R@1/5/10 both ways and their rsum
    (:func:`relevant_fraction_per_image`), and the per-image values each metric is the mean of, as a result
    file's ``per_query["query_means"]`` stores them. Only i2t differs from :func:`retrieval_metrics`."""
    units = relevant_fraction_per_image(sims, captions_per_image, RECALL_CUTOFFS, chunk_size)
    units["rsum"] = sum(units[key] for key in RECALL_KEYS)
    return ({key: float(values.mean()) for key, values in units.items()},
            {key: values.tolist() for key, values in units.items()})


# ---------------------------------------------------------------------------------------------------------------
# Within the text or the joint space
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def caption_retrieval_metrics(features: torch.Tensor, captions_per_image: int = 5, cutoffs=(1, 5, 10),
                              chunk_size: int = 1024) -> dict[str, float]:
    """Each caption queries all the others (cosine); the other captions of its image are the relevant ones.

    ``features`` is (M, D), image-major. Positions are counted pessimistically, like :func:`retrieval_ranks`: the
    j-th best relevant caption (1-based j) sits at position ``j + #{irrelevant captions with similarity >= its
    own}``. Returns ``r{K}`` = 100 x the fraction of queries with a relevant caption in the top K (the VSE++ "hit"
    convention), and ``map`` = MAP@all, with ``AP = (1 / R) sum_j j / position_j`` over the
    R = captions_per_image - 1 relevant captions.
    """
    count = len(features)
    if features.dim() != 2 or count == 0 or count % captions_per_image or captions_per_image < 2:
        raise ValueError(f"expected (M, D) features of M = images x {captions_per_image} (>= 2) captions, "
                         f"got {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features hold NaN or infinite values")
    features = F.normalize(features.double() if features.dtype == torch.float64 else features.float(), dim=1)
    relevant_count = captions_per_image - 1
    offsets = torch.arange(captions_per_image, device=features.device)
    first_positions, precisions = [], []
    for start in range(0, count, chunk_size):
        queries = torch.arange(start, min(start + chunk_size, count), device=features.device)  # (c,)
        sims = features[queries] @ features.T  # (c, M)
        members = (queries // captions_per_image)[:, None] * captions_per_image + offsets  # (c, cpi), self included
        others = members[members != queries[:, None]].view(len(queries), relevant_count)  # (c, R)
        relevant = sims.gather(1, others).sort(dim=1, descending=True).values  # (c, R), best first
        sims.scatter_(1, members, -torch.inf)  # leave only the irrelevant captions
        above = torch.stack([(sims >= relevant[:, j : j + 1]).view(torch.uint8).sum(dim=1, dtype=torch.int32)
                             for j in range(relevant_count)], dim=1)  # (c, R); a uint8 sum is faster than bool
        positions = above + torch.arange(1, relevant_count + 1, device=features.device)  # (c, R), 1-based
        first_positions.append(positions[:, 0])
        ranks_among_relevant = torch.arange(1, relevant_count + 1, device=features.device, dtype=torch.float64)
        precisions.append((ranks_among_relevant / positions).mean(dim=1))  # (c,) AP of each query
    first = torch.cat(first_positions)
    metrics = {f"r{k}": 100.0 * float((first <= k).double().mean()) for k in cutoffs}
    metrics["map"] = float(torch.cat(precisions).double().mean())
    return metrics


def joint_space_silhouette(image_features: torch.Tensor, text_features: torch.Tensor,
                           captions_per_image: int = 5) -> float:
    """Silhouette score (cosine) of the instance groups in a joint space, a group being an image (N, D) and its
    captions (N * captions_per_image, D): near 1 when every group is a tight cluster, near 0 or below when groups
    overlap (icone2024 Figs. 4-5 in one number)."""
    from sklearn.metrics import silhouette_score

    groups = torch.cat([torch.arange(len(image_features)), torch.arange(len(text_features)) // captions_per_image])
    points = F.normalize(torch.cat([image_features.float(), text_features.float()]).cpu(), dim=-1)
    return float(silhouette_score(points.numpy(), groups.numpy(), metric="cosine"))


# ---------------------------------------------------------------------------------------------------------------
# Category retrieval
# ---------------------------------------------------------------------------------------------------------------

def _check_labelled(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"{name} must be a 2-D (N, D) tensor, got {shape}")
    if features.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if not features.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {features.dtype}")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"{name}_labels must be a 1-D tensor of {features.shape[0]} class labels, got {shape} "
                         f"(flatten a (1, N) label array first)")


def _ranked_relevance(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                      gallery_labels: torch.Tensor, chunk_size: int) -> Iterator[torch.Tensor]:
    """Per query chunk, the (c, N_gallery) relevance of the gallery in descending cosine order (stable sort)."""
    _check_labelled(query, query_labels, "query")
    _check_labelled(gallery, gallery_labels, "gallery")
    _check_positive_int(chunk_size, "chunk_size")
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery features differ in width: {query.shape[1]} vs {gallery.shape[1]}")
    if query.device != gallery.device:
        raise ValueError(f"query and gallery are on different devices: {query.device} vs {gallery.device}")
    dtype = torch.promote_types(query.dtype, gallery.dtype)
    gallery = F.normalize(gallery.to(dtype), dim=1)                                        # (G, D)
    gallery_labels = gallery_labels.to(query.device)
    for start in range(0, query.shape[0], chunk_size):
        queries = F.normalize(query[start:start + chunk_size].to(dtype), dim=1)           # (c, D)
        sims = queries @ gallery.T                                                         # (c, G)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices             # (c, G)
        yield gallery_labels[order] == query_labels[start:start + chunk_size].to(query.device)[:, None]


def mean_average_precision(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                           gallery_labels: torch.Tensor, k: int | None = None, chunk_size: int = 1024) -> float:
    """MAP@k (MAP@all when ``k`` is None) of cosine retrieval, relevance = same label (DRCL protocol).

    ``AP = (1 / R_k) * sum_{r <= k} P@r * rel(r)`` with ``R_k`` the relevant items in the top ``k``, 0 when none;
    ties in similarity keep gallery-index order (stable sort). ``k`` larger than the gallery means all of it.
    Queries are processed ``chunk_size`` at a time (memory O(chunk_size * N_gallery)), on the inputs' device and in
    their floating dtype: pass float64 for agreement to the last bit with a scipy ``cdist`` evaluation.
    """
    return float(average_precisions(query, query_labels, gallery, gallery_labels, k, chunk_size).mean())


def average_precisions(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                       gallery_labels: torch.Tensor, k: int | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Every query's AP@k (float64, on the inputs' device): the per-query outcomes :func:`mean_average_precision`
    averages, which result files store so that a claim can be judged per query."""
    if k is not None:
        _check_positive_int(k, "k")
    precisions = []
    for relevant in _ranked_relevance(query, query_labels, gallery, gallery_labels, chunk_size):
        if k is not None:
            relevant = relevant[:, :k]                                                     # (c, k)
        hits = relevant.cumsum(dim=1)                                                      # (c, k)
        positions = torch.arange(1, relevant.shape[1] + 1, device=relevant.device, dtype=torch.float64)
        precision_sum = (hits / positions * relevant).sum(dim=1)                           # (c,)
        precisions.append(precision_sum / hits[:, -1].clamp(min=1))
    return torch.cat(precisions)


def precision_recall_curve(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                           gallery_labels: torch.Tensor, num_points: int = 11,
                           chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpolated precision at ``num_points`` evenly spaced recall levels, averaged over queries (DRCL Fig. 2).

    For each query, ranked as in :func:`mean_average_precision`, precision and recall are taken at every cut-off
    n = 1 ... N_gallery (recall = relevant in the top n / relevant in the gallery); the interpolated precision at
    recall level r is the largest precision at any cut-off whose recall is >= r (the TREC / PASCAL 11-point
    convention; level 0 gives the best precision anywhere). The curve is the mean over queries that have at least
    one relevant gallery item (the others have no recall). Returns ``(recall_levels, mean_precision)``, float64
    tensors of length ``num_points`` on the CPU; levels are ``i / (num_points - 1)``, compared exactly.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    levels = torch.arange(num_points)
    totals, count = None, 0
    for relevant in _ranked_relevance(query, query_labels, gallery, gallery_labels, chunk_size):
        hits = relevant.cumsum(dim=1)                                                      # (c, G)
        n_relevant = hits[:, -1]                                                           # (c,)
        keep = n_relevant > 0
        hits, n_relevant = hits[keep], n_relevant[keep]
        if hits.shape[0] == 0:
            continue
        positions = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
        precision = hits / positions                                                       # (c, G)
        best_from_here = precision.flip(1).cummax(dim=1).values.flip(1)                    # (c, G)
        # recall >= i / (L - 1)  <=>  hits >= ceil(i * R / (L - 1)): integer arithmetic, no float edge cases
        needed = (levels.to(hits.device)[None, :] * n_relevant[:, None] + num_points - 2) // (num_points - 1)
        first_cutoff = torch.searchsorted(hits, needed)                                    # (c, L)
        curve = best_from_here.gather(1, first_cutoff).sum(dim=0)                          # (L,)
        totals = curve if totals is None else totals + curve
        count += hits.shape[0]
    if count == 0:
        raise ValueError("no query has a relevant gallery item: the precision-recall curve is undefined")
    return levels.to(torch.float64) / (num_points - 1), (totals / count).cpu()


# ---------------------------------------------------------------------------------------------------------------
# Human relevance judgements beyond the paired captions (Flickr8k's expert and crowd annotations)
# ---------------------------------------------------------------------------------------------------------------
# Hodosh, Young & Hockenmaier (2013, JAIR 47) judged test image-caption pairs beyond the five paired captions
# (xmr.data.relevance). ``judgements`` below is any object with ``image_index`` and ``caption_index`` ((P,) int64
# into the split's images and image-major captions), ``relevance`` ((P,) graded score: the mean expert score, or
# the crowd's yes proportion), ``is_relevant(threshold)`` ((P,) bool; None = the judgements' default threshold:
# expert mean >= 3, crowd yes proportion > 0.5), ``num_images`` and ``captions_per_image``. Ties in ``sims`` are
# ranked pessimistically, as in :func:`retrieval_ranks`.


HUMAN_RELEVANCE_SOURCES = ("expert", "crowd")


def _check_judgements(sims: torch.Tensor, judgements, captions_per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The judged pairs' ``(image_index, caption_index)`` on ``sims``' device, checked to fit ``sims``."""
    _check_sims(sims, captions_per_image)
    n_images = sims.shape[0]
    if judgements.num_images != n_images or judgements.captions_per_image != captions_per_image:
        raise ValueError(f"judgements of {judgements.num_images} images x {judgements.captions_per_image} captions "
                         f"do not fit sims of shape {tuple(sims.shape)} with {captions_per_image} captions per image: "
                         f"pass the similarity matrix of the whole split the judgements were loaded for")
    pairs = torch.stack([torch.as_tensor(judgements.image_index), torch.as_tensor(judgements.caption_index)], 1)
    pairs = _check_pairs(pairs, sims.shape, "judgements")
    return pairs[:, 0], pairs[:, 1]


def _check_pairs(pairs, shape: tuple[int, int], name: str) -> torch.Tensor:
    pairs = torch.as_tensor(pairs)
    if pairs.numel() == 0:
        return torch.zeros(0, 2, dtype=torch.int64)
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.is_floating_point() or pairs.is_complex() \
            or pairs.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer (E, 2) array of (image index, caption index), got dtype "
                         f"{pairs.dtype} and shape {tuple(pairs.shape)}")
    pairs = pairs.to(torch.int64)
    for column, (what, size) in enumerate(zip(("image", "caption"), shape)):
        if bool(((pairs[:, column] < 0) | (pairs[:, column] >= size)).any()):
            raise ValueError(f"{name} holds {what} indices outside 0..{size - 1}")
    return pairs


def _finite_block(block: torch.Tensor) -> torch.Tensor:
    """A block of ``sims`` checked for NaN/infinity, in a dtype that ``-inf`` fills and ``searchsorted`` accept."""
    if not bool(torch.isfinite(block).all()):
        raise ValueError("sims holds NaN or infinite values; ranks would be meaningless")
    if not block.is_floating_point():
        return block.to(torch.float64)
    return block.float() if block.dtype in (torch.float16, torch.bfloat16) else block


def judged_kendall_tau(sims: torch.Tensor, judgements, captions_per_image: int = 5,
                       chunk_size: int = 1024) -> torch.Tensor:
    """Kendall's tau-b, per image query, between the model's similarities and the human graded relevance
    (``judgements.relevance``: the mean expert score) over that image's judged captions.

    Hodosh et al. (2013) measure how well automatic scores agree with their expert judgements with Kendall's tau;
    here the automatic score is the model's similarity and tau is taken within each image query (what a
    retrieval model has to order), then averaged. Returns a float64 tensor of length N_images on ``sims``' device:
    NaN for an image with fewer than 2 judged captions or with the same human score on all of them (tau-b is
    undefined there), so the mean is over a subset of queries that depends on the judgements only (use
    ``nanmean``). Where the model gives all of an image's judged captions the same score, tau-b's denominator is 0
    too; such a query counts as 0 (no agreement) rather than being dropped, so that every model is averaged over
    the same queries and a constant model scores 0. Elsewhere the value equals
    ``scipy.stats.kendalltau(model, human, variant="b")``.
    """
    image_index, caption_index = _check_judgements(sims, judgements, captions_per_image)
    _check_positive_int(chunk_size, "chunk_size")
    n_images, device = sims.shape[0], sims.device
    tau = torch.full((n_images,), float("nan"), dtype=torch.float64, device=device)
    if image_index.numel() == 0:
        return tau
    human = torch.as_tensor(judgements.relevance).to(device=device, dtype=torch.float64)
    image_index, caption_index = image_index.to(device), caption_index.to(device)
    order = torch.sort(image_index, stable=True).indices
    image_index, caption_index, human = image_index[order], caption_index[order], human[order]
    counts = torch.bincount(image_index, minlength=n_images)                               # (N_images,)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(image_index.numel(), device=device) - starts[image_index]          # position in its image
    width = int(counts.max())
    model = _finite_block(sims[image_index, caption_index]).to(torch.float64)
    padded_model = torch.zeros(n_images, width, dtype=torch.float64, device=device)
    padded_human = torch.zeros(n_images, width, dtype=torch.float64, device=device)
    judged = torch.zeros(n_images, width, dtype=torch.bool, device=device)
    padded_model[image_index, slot], padded_human[image_index, slot] = model, human
    judged[image_index, slot] = True

    def signs(values: torch.Tensor) -> torch.Tensor:                                       # (c, M) -> (c, M, M)
        return ((values[:, :, None] > values[:, None, :]).to(torch.int8)
                - (values[:, :, None] < values[:, None, :]).to(torch.int8))

    rows_per_chunk = max(1, min(chunk_size, (1 << 20) // (width * width)))
    for start in range(0, n_images, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        both = (judged[rows, :, None] & judged[rows, None, :]).to(torch.int8)              # (c, M, M)
        model_signs, human_signs = signs(padded_model[rows]) * both, signs(padded_human[rows]) * both
        # every unordered pair is counted twice, in numerator and denominator alike
        concordance = (model_signs * human_signs).sum(dim=(1, 2)).to(torch.float64)      # 2 (C - D)
        model_untied = (model_signs != 0).sum(dim=(1, 2)).to(torch.float64)              # 2 (n0 - n1)
        human_untied = (human_signs != 0).sum(dim=(1, 2)).to(torch.float64)              # 2 (n0 - n2)
        value = concordance / torch.sqrt(model_untied * human_untied).clamp(min=1.0)
        tau[rows] = torch.where(human_untied > 0, value, torch.full_like(value, float("nan")))
    return tau


def _ranks_among_positives(block: torch.Tensor, positive: torch.Tensor,
                           with_r_precision: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of ``block`` (c, G) with a boolean ``positive`` mask (at least one per row): the pessimistic 0-based
    rank of the best positive and, if asked, the R-precision (float64)."""
    best = block.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)          # (c, 1)
    ranks = ((block >= best) & ~positive).sum(dim=1)                                       # (c,)
    if not with_r_precision:
        return ranks, None
    # Pessimistic order: by descending score, negatives before positives of equal score. The k-th best positive
    # (0-based) then sits at position k + (#negatives scoring >= it), and the top R holds those with position < R.
    n_positive = positive.sum(dim=1)                                                       # (c,) = R
    negatives = torch.sort(block.masked_fill(positive, float("-inf")), dim=1).values       # (c, G) ascending
    positives = torch.topk(block.masked_fill(~positive, float("-inf")), int(n_positive.max()),
                           dim=1).values                                                   # (c, R_max) descending
    negatives_at_or_above = block.shape[1] - torch.searchsorted(negatives, positives.contiguous(), side="left")
    k = torch.arange(positives.shape[1], device=block.device)
    hits = ((k + negatives_at_or_above < n_positive[:, None]) & (k < n_positive[:, None])).sum(dim=1)
    return ranks, hits.to(torch.float64) / n_positive.to(torch.float64)


def _extended_direction(sims: torch.Tensor, own_positives: Callable[[torch.Tensor], torch.Tensor],
                        extra: torch.Tensor, chunk_size: int,
                        with_r_precision: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks (int64) and R-precisions (float64, unset without ``with_r_precision``) of one direction's queries.

    ``sims`` is (N_queries, N_gallery), possibly a transposed view; ``own_positives(queries)`` gives the (c, k)
    gallery indices of each query's own ground truth, ``extra`` the (E, 2) extra ``(query, gallery)`` positives.
    """
    n_queries, device = sims.shape[0], sims.device
    ranks = torch.empty(n_queries, dtype=torch.int64, device=device)
    precisions = torch.empty(n_queries, dtype=torch.float64, device=device)
    for start in range(0, n_queries, chunk_size):
        block = _finite_block(sims[start:start + chunk_size].contiguous())                  # (c, N_gallery)
        rows = torch.arange(block.shape[0], device=device)
        positive = torch.zeros(block.shape, dtype=torch.bool, device=device)
        positive[rows[:, None], own_positives(start + rows)] = True
        inside = (extra[:, 0] >= start) & (extra[:, 0] < start + block.shape[0])
        positive[extra[inside, 0] - start, extra[inside, 1]] = True
        block_ranks, block_precisions = _ranks_among_positives(block, positive, with_r_precision)
        ranks[start:start + block.shape[0]] = block_ranks
        if with_r_precision:
            precisions[start:start + block.shape[0]] = block_precisions
    return ranks, precisions


def _extended_statistics(sims: torch.Tensor, extra_positives, captions_per_image: int, chunk_size: int,
                         with_r_precision: bool):
    """``(i2t_ranks, t2i_ranks, i2t_precisions, t2i_precisions)`` of :func:`extended_ranks` and
    :func:`extended_r_precision`."""
    _check_sims(sims, captions_per_image)
    _check_positive_int(chunk_size, "chunk_size")
    extra = _check_pairs(extra_positives, tuple(sims.shape), "extra_positives").to(sims.device)
    offsets = torch.arange(captions_per_image, device=sims.device)
    i2t_ranks, i2t_precisions = _extended_direction(                               # image queries, captions ranked
        sims, lambda images: images[:, None] * captions_per_image + offsets, extra, chunk_size, with_r_precision)
    t2i_ranks, t2i_precisions = _extended_direction(                               # caption queries, images ranked
        sims.T, lambda captions: (captions // captions_per_image)[:, None], extra.flip(1), chunk_size,
        with_r_precision)
    return i2t_ranks, t2i_ranks, i2t_precisions, t2i_precisions


def extended_ranks(sims: torch.Tensor, extra_positives, captions_per_image: int = 5,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """0-based ranks with extra positives: :func:`retrieval_ranks` where a query's ground truth also holds the
    pairs of ``extra_positives`` ((E, 2) integer ``(image index, caption index)``, e.g. the pairs humans judged
    relevant: ``judgements.relevant_pairs()``).

    i2t: an image's rank is that of its best-ranked positive among its own captions and the extra captions judged
    relevant to it. t2i: a caption's rank is that of its best-ranked positive among its own image and the images
    it was judged relevant to. Ties are pessimistic (non-positives scoring >= the best positive are counted, other
    positives never are), so with no extra pair this is exactly :func:`retrieval_ranks`, and R@K with extended
    positives is ``100 * mean(rank < K)``. Returns int64 tensors of lengths N_images and N_captions.
    """
    i2t_ranks, t2i_ranks, _, _ = _extended_statistics(sims, extra_positives, captions_per_image, chunk_size, False)
    return i2t_ranks, t2i_ranks


def extended_r_precision(sims: torch.Tensor, extra_positives, captions_per_image: int = 5,
                         chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """R-precision per query with the positives of :func:`extended_ranks`: with R positives for a query, the
    fraction of its top R results that are positive, ranked pessimistically (a positive tied with negatives comes
    after them). Returns float64 tensors in [0, 1] of lengths N_images (i2t) and N_captions (t2i)."""
    _, _, i2t_precision, t2i_precision = _extended_statistics(sims, extra_positives, captions_per_image,
                                                              chunk_size, True)
    return i2t_precision, t2i_precision


class JudgedErrors(NamedTuple):
    """What :func:`share_of_errors_judged_relevant` returns."""

    share: float                    # mean of judged_relevant over the error queries (NaN when there is none)
    judged_relevant: torch.Tensor   # (N_images,) float64: 1 / 0 for an error query, NaN for a correct one
    judged: torch.Tensor            # (N_images,) float64: 1 if its top-1 caption was judged at all, NaN if correct


def share_of_errors_judged_relevant(sims: torch.Tensor, judgements, threshold: float | None = None,
                                    captions_per_image: int = 5, chunk_size: int = 1024) -> JudgedErrors:
    """Among image queries whose top-1 caption is not one of their own (i2t rank >= 1 under :func:`retrieval_ranks`),
    the share whose top-1 caption humans judged relevant to the image (``judgements.is_relevant(threshold)``).

    The top-1 caption of an error query is its best-scoring caption from another image; when several tie for it,
    the query counts as judged relevant only if all of them are (the pessimistic tie rule). A top-1 caption nobody
    judged for that image counts as not relevant: the share is a lower bound, and ``judged`` says per query whether
    the top-1 caption(s) were judged at all (its mean over error queries is the judgements' coverage of the errors).
    """
    image_index, caption_index = _check_judgements(sims, judgements, captions_per_image)
    _check_positive_int(chunk_size, "chunk_size")
    n_images, n_captions = sims.shape
    device = sims.device
    relevant_flags = torch.as_tensor(judgements.is_relevant(threshold)).to(device=device, dtype=torch.bool)
    image_index, caption_index = image_index.to(device), caption_index.to(device)
    judged_relevant = torch.full((n_images,), float("nan"), dtype=torch.float64, device=device)
    judged = torch.full((n_images,), float("nan"), dtype=torch.float64, device=device)
    offsets = torch.arange(captions_per_image, device=device)
    for start in range(0, n_images, chunk_size):
        block = _finite_block(sims[start:start + chunk_size])                               # (c, N_captions)
        count = block.shape[0]
        rows = torch.arange(count, device=device)
        own = torch.zeros(block.shape, dtype=torch.bool, device=device)
        own[rows[:, None], (start + rows)[:, None] * captions_per_image + offsets] = True
        inside = (image_index >= start) & (image_index < start + count)
        is_judged = torch.zeros(block.shape, dtype=torch.bool, device=device)
        is_relevant = torch.zeros(block.shape, dtype=torch.bool, device=device)
        is_judged[image_index[inside] - start, caption_index[inside]] = True
        is_relevant[image_index[inside] - start, caption_index[inside]] = relevant_flags[inside]
        best_own = block.masked_fill(~own, float("-inf")).amax(dim=1)                     # (c,)
        best_other = block.masked_fill(own, float("-inf")).amax(dim=1, keepdim=True)       # (c, 1)
        error = best_other[:, 0] >= best_own                                               # (c,)
        top = (block == best_other) & ~own                                                 # (c, N_captions)
        all_relevant = (is_relevant | ~top).all(dim=1).to(torch.float64)
        all_judged = (is_judged | ~top).all(dim=1).to(torch.float64)
        nan = torch.full_like(all_relevant, float("nan"))
        judged_relevant[start:start + count] = torch.where(error, all_relevant, nan)
        judged[start:start + count] = torch.where(error, all_judged, nan)
    errors = ~torch.isnan(judged_relevant)
    share = float(judged_relevant[errors].mean()) if bool(errors.any()) else float("nan")
    return JudgedErrors(share, judged_relevant, judged)


def human_relevance_evaluation(sims: torch.Tensor, expert, crowd, expert_threshold: float | None = None,
                               crowd_threshold: float | None = None, captions_per_image: int = 5,
                               chunk_size: int = 1024) -> tuple[dict[str, float | None], dict]:
    """``(metrics, per_query)`` of a split's similarity matrix against Flickr8k's human judgements.

    ``expert`` and ``crowd`` come from :func:`xmr.data.load_expert_judgements` and
    :func:`xmr.data.load_crowd_judgements` (either may be None to skip it); thresholds default to the judgements'
    own (expert mean score >= 3, crowd yes proportion > 0.5). Metrics, for each given source ``<s>``:

    - ``<s>_i2t_r1 ... <s>_t2i_meanr``, ``<s>_rsum``: :func:`metrics_from_ranks` of the ranks with the pairs judged
      relevant as extra positives (:func:`extended_ranks`); ``<s>_i2t_rprecision``, ``<s>_t2i_rprecision``
      (percent): R-precision with them;
    - ``<s>_errors_judged_relevant`` and ``<s>_errors_judged`` (percent): over image queries whose top-1 caption
      is not their own, the share whose top-1 caption was judged relevant, and judged at all
      (:func:`share_of_errors_judged_relevant`);
    - ``expert_tau_b``: mean per-image Kendall tau-b with the mean expert score (:func:`judged_kendall_tau`).

    ``per_query["extended_ranks"][<s>]`` holds the extended ranks in the layout of ``caption_ranks``
    (:func:`retrieval_evaluation`); ``per_query["query_means"][name]`` lists the per-query values whose mean is
    ``metrics[name]`` for the others. A metric averaged over a subset of queries stores that subset's values only,
    and is None (with no list) when the subset is empty.
    """
    metrics: dict[str, float | None] = {}
    query_means: dict[str, list[float]] = {}
    extended: dict[str, dict] = {}

    def record(name: str, values: torch.Tensor) -> None:
        # for subset metrics ``values`` holds NaN outside the subset; only the subset is stored
        values = values[~torch.isnan(values)].to(torch.float64).cpu()
        metrics[name] = float(values.mean()) if values.numel() else None
        if values.numel():
            query_means[name] = values.tolist()

    for source, judgements, threshold in (("expert", expert, expert_threshold), ("crowd", crowd, crowd_threshold)):
        if judgements is None:
            continue
        _check_judgements(sims, judgements, captions_per_image)
        extra = judgements.relevant_pairs(threshold)
        i2t_ranks, t2i_ranks, i2t_precision, t2i_precision = _extended_statistics(
            sims, extra, captions_per_image, chunk_size, True)
        metrics.update({f"{source}_{name}": value for name, value in metrics_from_ranks(i2t_ranks, t2i_ranks).items()})
        extended[source] = {"captions_per_image": captions_per_image, "i2t": i2t_ranks.cpu().tolist(),
                            "t2i": t2i_ranks.cpu().tolist()}
        record(f"{source}_i2t_rprecision", 100.0 * i2t_precision)
        record(f"{source}_t2i_rprecision", 100.0 * t2i_precision)
        errors = share_of_errors_judged_relevant(sims, judgements, threshold, captions_per_image, chunk_size)
        record(f"{source}_errors_judged_relevant", 100.0 * errors.judged_relevant)   # subset: error queries
        record(f"{source}_errors_judged", 100.0 * errors.judged)                     # subset: error queries
        if source == "expert":
            # subset: images with >= 2 judged captions whose human scores are not all equal
            record("expert_tau_b", judged_kendall_tau(sims, judgements, captions_per_image, chunk_size))
    if not metrics:
        raise ValueError("pass expert or crowd judgements (or both)")
    return metrics, {"extended_ranks": extended, "query_means": query_means}
