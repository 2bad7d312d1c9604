"""Evaluation protocols: caption retrieval (R@K, MedR, MeanR, Rsum) and category retrieval (MAP, PR curves).

Caption retrieval (VSE++ convention, used by every image-caption paper in this project)
---------------------------------------------------------------------------------------
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

Category retrieval (DRCL and its baselines)
-------------------------------------------
Similarity is cosine (both sides L2-normalised), relevance is "same class label". Each query's gallery is sorted
by descending similarity with a **stable** sort, so equal similarities keep gallery-index order. (The authors'
``fx_calc_map_label`` sorts scipy ``cdist(..., 'cosine')`` distances with numpy's default, unstable quicksort;
on the DRCL Wikipedia features the two orders differ by 3e-5 in MAP.) Then, for a cut-off ``k``,
``AP = (1 / R_k) * sum_{r <= k} P@r * rel(r)`` with ``R_k`` the number of relevant items in the top ``k`` and
``AP = 0`` when there is none; MAP is the mean AP over queries (MAP@all: ``k`` = gallery size).
"""

from __future__ import annotations

from collections.abc import Iterator

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
    metrics = {**_summarise_ranks(torch.as_tensor(i2t_ranks), "i2t"), **_summarise_ranks(torch.as_tensor(t2i_ranks), "t2i")}
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

