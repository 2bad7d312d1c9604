"""Top-k retrieval over galleries too large for a full (Q, N) similarity matrix.

:func:`topk_search` is exact and needs only ``Q x chunk_size`` scores at a time: it walks the gallery in chunks,
takes each chunk's top k (``torch.topk``) and merges it into a running top k. The gallery may live on the CPU
(even a ``torch.from_numpy`` view of a ``numpy.memmap``) while the queries are on a GPU: each chunk is moved to
the queries' device. **Tie rule:** equal scores rank by gallery index, the smaller first (what a stable
descending sort of the full matrix gives), whatever the chunk size; NaN scores are not supported.

:class:`FaissIndex` wraps FAISS (``pip install faiss-cpu``, imported only when an index is built): ``"flat"``
is the exact ``IndexFlatIP``, ``"ivf"`` the approximate ``IndexIVFFlat`` (``nlist`` k-means cells, ``nprobe``
of them searched per query); :func:`recall_at_k_vs_exact` measures what the approximation loses.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _compute_dtype(queries: torch.Tensor, gallery: torch.Tensor) -> torch.dtype:
    """float32 at least (half storage is scored in float32), float64 if either side is."""
    return torch.promote_types(torch.promote_types(queries.dtype, gallery.dtype), torch.float32)


def _first_k(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best columns of each row by (score descending, then column order): columns must already be in
    ascending gallery-index order among equal scores, which the stable sort keeps."""
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores[:, :k], indices.gather(1, order[:, :k])


def _chunk_topk(scores: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of a (Q, C) score block with the tie rule; gallery indices offset by ``offset``."""
    k = min(k, scores.shape[1])
    best, columns = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1)  # (Q, k + 1), sorted; ties in any order
    # A row whose (k+1)-th best equals its k-th has a tie across the cut (more than k columns reach the k-th
    # score): redo it with a stable sort so the smaller indices win. With continuous scores this is rare.
    tied = (best[:, k] == best[:, k - 1]) if best.shape[1] > k else best.new_zeros(len(best), dtype=torch.bool)
    best, columns = best[:, :k], columns[:, :k]
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sorted_scores, order = torch.sort(scores[rows], dim=1, descending=True, stable=True)
        best[rows], columns[rows] = sorted_scores[:, :k], order[:, :k]
    # Among equal scores inside the k kept, order by index (topk may return them in any order).
    columns, by_column = torch.sort(columns, dim=1)
    best, columns = _first_k(best.gather(1, by_column), columns, k)
    return best, columns + offset


@torch.no_grad()
def topk_search(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int = 16384,
                metric: str = "inner_product", query_chunk_size: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top ``k`` of ``queries`` (Q, D) against ``gallery`` (N, D); returns ``(scores, indices)``, (Q, k)
    each, best first, on the queries' device (indices int64).

    ``metric="inner_product"`` scores ``q . g``; ``"cosine"`` L2-normalises both sides first (the gallery one
    chunk at a time). Scores are computed in float32 at least (float16 storage is upcast per chunk) or float64
    if an input is. Peak extra memory is about ``Q x chunk_size`` scores plus one chunk in the compute dtype;
    ``query_chunk_size`` bounds Q too. Ties: the smaller gallery index first (module docstring).
    """
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"expected (Q, D) queries and (N, D) gallery, got {tuple(queries.shape)} and "
                         f"{tuple(gallery.shape)}")
    if not 1 <= k <= len(gallery):
        raise ValueError(f"k must be between 1 and the gallery size {len(gallery)}, got {k}")
    if metric not in ("inner_product", "cosine"):
        raise ValueError(f"metric must be 'inner_product' or 'cosine', got {metric!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if query_chunk_size is not None and len(queries) > query_chunk_size:
        parts = [topk_search(block, gallery, k, chunk_size, metric) for block in queries.split(query_chunk_size)]
        return torch.cat([scores for scores, _ in parts]), torch.cat([indices for _, indices in parts])
    dtype = _compute_dtype(queries, gallery)
    queries = queries.to(dtype)
    if metric == "cosine":
        queries = F.normalize(queries, dim=1)
    best_scores = best_indices = None
    for start in range(0, len(gallery), chunk_size):
        chunk = gallery[start : start + chunk_size].to(queries.device, dtype, non_blocking=True)  # (C, D)
        if metric == "cosine":
            chunk = F.normalize(chunk, dim=1)
        scores, indices = _chunk_topk(queries @ chunk.T, k, start)  # (Q, <=k) from a (Q, C) block
        if best_scores is None:
            best_scores, best_indices = scores, indices
        else:  # earlier chunks hold smaller indices, so concatenating them first keeps the tie rule
            best_scores, best_indices = _first_k(torch.cat([best_scores, scores], 1),
                                                 torch.cat([best_indices, indices], 1), k)
    return best_scores, best_indices


@torch.no_grad()
def full_matrix_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int,
                     metric: str = "inner_product") -> tuple[torch.Tensor, torch.Tensor]:
    """The naive baseline: the whole (Q, N) score matrix, then a stable descending sort (same tie rule)."""
    dtype = _compute_dtype(queries, gallery)
    queries, gallery = queries.to(dtype), gallery.to(queries.device, dtype)
    if metric == "cosine":
        queries, gallery = F.normalize(queries, dim=1), F.normalize(gallery, dim=1)
    scores = queries @ gallery.T  # (Q, N)
    indices = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
    return _first_k(scores, indices, k)


def recall_at_k_vs_exact(approx_indices: torch.Tensor | np.ndarray, exact_indices: torch.Tensor | np.ndarray) -> float:
    """Mean over queries of ``|approx top k  intersect  exact top k| / k`` (both (Q, k); FAISS's -1 for "no
    result" never matches). 1.0 means the approximate search found every exact neighbour."""
    approx, exact = torch.as_tensor(approx_indices), torch.as_tensor(exact_indices)
    if approx.shape != exact.shape or approx.dim() != 2:
        raise ValueError(f"expected two (Q, k) index arrays of one shape, got {tuple(approx.shape)} and "
                         f"{tuple(exact.shape)}")
    found = (approx[:, :, None] == exact[:, None, :]) & (approx[:, :, None] >= 0)  # (Q, k, k)
    return float(found.any(dim=2).sum()) / approx.numel()


def _import_faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("FaissIndex needs FAISS, which is not installed: pip install faiss-cpu "
                          "(topk_search is exact and needs nothing more)") from error
    return faiss


class FaissIndex:
    """A FAISS inner-product index over a gallery: ``kind="flat"`` (exact ``IndexFlatIP``) or ``"ivf"``
    (approximate ``IndexIVFFlat``: ``nlist`` k-means cells trained on the gallery, or on ``train_size`` of it,
    ``nprobe`` cells searched per query). ``metric="cosine"`` L2-normalises gallery and queries.
    ``search(queries, k)`` returns ``(scores, indices)`` as torch tensors like :func:`topk_search`.
    """

    def __init__(self, gallery: torch.Tensor, kind: str = "flat", nlist: int = 1024, nprobe: int = 8,
                 metric: str = "inner_product", train_size: int | None = None, seed: int = 0):
        faiss = _import_faiss()
        if kind not in ("flat", "ivf"):
            raise ValueError(f"kind must be 'flat' or 'ivf', got {kind!r}")
        self.kind, self.metric = kind, metric
        vectors = self._prepare(gallery)
        dim = vectors.shape[1]
        if kind == "flat":
            self.index = faiss.IndexFlatIP(dim)
        else:
            self.quantizer = faiss.IndexFlatIP(dim)  # kept referenced: the IVF index does not own it
            self.index = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = vectors
            if train_size is not None and train_size < len(vectors):
                rows = np.random.default_rng(seed).choice(len(vectors), train_size, replace=False)
                sample = vectors[np.sort(rows)]
            self.index.train(sample)
            self.index.nprobe = nprobe
        self.index.add(vectors)

    def _prepare(self, vectors: torch.Tensor) -> np.ndarray:
        vectors = torch.as_tensor(vectors).detach().to("cpu", torch.float32)
        if self.metric == "cosine":
            vectors = F.normalize(vectors, dim=1)
        return np.ascontiguousarray(vectors.numpy())

    @property
    def nprobe(self) -> int:
        return self.index.nprobe if self.kind == "ivf" else 0

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.kind == "ivf":
            self.index.nprobe = value

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, indices = self.index.search(self._prepare(queries), k)
        return torch.from_numpy(scores), torch.from_numpy(indices)
