"""Chunked top-k equals the full-matrix top-k (ties included); FAISS wrapped lazily; recall against exact."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmr.search import FaissIndex, full_matrix_topk, recall_at_k_vs_exact, topk_search


def reference_topk(queries, gallery, k):
    """Plain loops: each query's gallery indices sorted by (score descending, index ascending)."""
    scores = (queries.double() @ gallery.double().T).tolist()
    indices = [sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in scores]
    return torch.tensor([[row[j] for j in chosen] for row, chosen in zip(scores, indices)]), torch.tensor(indices)


@pytest.fixture
def integer_data(generator):
    """Small integer features: every score is exact in any dtype, and many scores tie."""
    queries = torch.randint(-2, 3, (7, 4), generator=generator).float()
    gallery = torch.randint(-2, 3, (103, 4), generator=generator).float()
    return queries, gallery


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64, 103, 1000])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_chunked_topk_equals_the_plain_reference_with_ties(integer_data, chunk_size, k):
    queries, gallery = integer_data
    expected_scores, expected_indices = reference_topk(queries, gallery, k)
    scores, indices = topk_search(queries, gallery, k, chunk_size=chunk_size)
    assert torch.equal(indices, expected_indices) and torch.equal(scores.double(), expected_scores)
    assert indices.dtype == torch.int64 and scores.dtype == torch.float32
    full_scores, full_indices = full_matrix_topk(queries, gallery, k)
    assert torch.equal(full_indices, expected_indices) and torch.equal(full_scores, scores)


def test_all_scores_equal_gives_the_first_indices():
    scores, indices = topk_search(torch.ones(3, 2), torch.zeros(50, 2), k=6, chunk_size=7)
    assert torch.equal(indices, torch.arange(6).expand(3, 6)) and torch.equal(scores, torch.zeros(3, 6))


def test_duplicate_gallery_items_rank_by_index():
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    _, indices = topk_search(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), gallery, k=4, chunk_size=2)
    assert indices.tolist() == [[0, 2, 5, 3], [1, 4, 3, 0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", ["inner_product", "cosine"])
def test_random_features_match_the_full_matrix(generator, dtype, metric):
    queries = torch.randn(20, 16, generator=generator, dtype=dtype)
    gallery = 3 * torch.randn(1000, 16, generator=generator, dtype=dtype)
    expected_scores, expected_indices = full_matrix_topk(queries, gallery, 10, metric)
    for chunk_size, query_chunk_size in [(37, None), (256, 7), (5000, None)]:
        scores, indices = topk_search(queries, gallery, 10, chunk_size, metric, query_chunk_size)
        assert scores.dtype == dtype and torch.equal(indices, expected_indices)
        torch.testing.assert_close(scores, expected_scores)
    if metric == "cosine":
        assert scores.max() <= 1 + 1e-6
        manual = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T
        torch.testing.assert_close(scores, manual.topk(10, dim=1).values)


def test_half_storage_is_scored_in_float32(integer_data):
    queries, gallery = integer_data
    scores, indices = topk_search(queries.half(), gallery.half(), 5, chunk_size=16)
    expected_scores, expected_indices = topk_search(queries, gallery, 5)
    assert scores.dtype == torch.float32 and torch.equal(indices, expected_indices)
    assert torch.equal(scores, expected_scores)


def test_numpy_memmap_gallery(tmp_path, integer_data):
    queries, gallery = integer_data
    stored = np.lib.format.open_memmap(tmp_path / "gallery.npy", mode="w+", dtype=np.float32,
                                       shape=tuple(gallery.shape))
    stored[:] = gallery.numpy()
    stored.flush()
    on_disk = np.load(tmp_path / "gallery.npy", mmap_mode="r+")  # pages read as the chunks are scored
    _, indices = topk_search(queries, torch.from_numpy(on_disk), 5, chunk_size=10)
    assert torch.equal(indices, reference_topk(queries, gallery, 5)[1])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="k must be"):
        topk_search(torch.ones(2, 3), torch.ones(4, 3), k=5)
    with pytest.raises(ValueError, match="expected"):
        topk_search(torch.ones(2, 3), torch.ones(4, 2), k=1)
    with pytest.raises(ValueError, match="metric"):
        topk_search(torch.ones(2, 3), torch.ones(4, 3), k=1, metric="l2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_queries_with_a_cpu_gallery(integer_data):
    queries, gallery = integer_data
    scores, indices = topk_search(queries.cuda(), gallery, 20, chunk_size=10)
    assert indices.is_cuda and torch.equal(indices.cpu(), reference_topk(queries, gallery, 20)[1])


def test_recall_against_exact():
    exact = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert recall_at_k_vs_exact(exact, exact) == 1.0
    assert recall_at_k_vs_exact(torch.tensor([[2, 1, 9], [-1, -1, -1]]), exact) == pytest.approx(2 / 6)
    assert recall_at_k_vs_exact(np.array([[5, 4, 3], [0, 1, 2]]), exact.numpy()) == 0.0
    with pytest.raises(ValueError):
        recall_at_k_vs_exact(exact[:, :2], exact)


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        FaissIndex(torch.randn(10, 4))


def test_faiss_flat_is_exact_and_ivf_recall_grows_with_nprobe(generator):
    pytest.importorskip("faiss")
    gallery = F.normalize(torch.randn(2000, 16, generator=generator), dim=1)
    queries = F.normalize(torch.randn(50, 16, generator=generator), dim=1)
    exact_scores, exact_indices = topk_search(queries, gallery, 10)
    scores, indices = FaissIndex(gallery, "flat").search(queries, 10)
    assert recall_at_k_vs_exact(indices, exact_indices) == 1.0
    torch.testing.assert_close(scores, exact_scores, atol=1e-5, rtol=0)
    ivf = FaissIndex(gallery, "ivf", nlist=16, nprobe=1)
    low = recall_at_k_vs_exact(ivf.search(queries, 10)[1], exact_indices)
    ivf.nprobe = 16  # every cell: exact
    assert low < 1.0 and recall_at_k_vs_exact(ivf.search(queries, 10)[1], exact_indices) == 1.0
