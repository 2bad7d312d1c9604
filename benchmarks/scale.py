"""Large-gallery search: chunked exact top-k against the full-matrix baseline, and FAISS where installed.

    nice -n 19 python benchmarks/scale.py [--gallery 1000000] [--queries 1000] [--dim 256] [--threads 1]

A synthetic gallery of unit vectors drawn around ``--clusters`` random centres (so that neighbours, and IVF's
cells, mean something) in float32 (1M x 256 = 1.0 GB), queries from the same distribution. Each method runs
once; its peak memory is the process's peak resident set during the call (``VmHWM``, reset before it through
``/proc/self/clear_refs``) minus the resident set before it, i.e. what the method allocates on top of the
gallery and queries. The full-matrix baseline (``queries @ gallery.T`` then ``torch.topk``) runs on the first
``--baseline-gallery`` items only: at the full size its (Q, N) float32 score matrix alone is Q x N x 4 bytes.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from xmr.search import FaissIndex, recall_at_k_vs_exact, topk_search


def resident_kib(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure(function):
    """(result, seconds, peak MiB above the resident set at the start) of ``function()``."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = resident_kib()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    return result, seconds, (resident_kib("VmHWM") - before) / 1024


def clustered_unit_vectors(count: int, dim: int, centres: torch.Tensor, noise: float, generator: torch.Generator,
                           chunk: int = 65536) -> torch.Tensor:
    """(count, dim) float32 rows ``normalise(centre + noise * N(0, I))``, filled in chunks (no full-size temp)."""
    out = torch.empty(count, dim)
    for start in range(0, count, chunk):
        rows = out[start : start + chunk]
        rows.normal_(generator=generator).mul_(noise)
        rows += centres[torch.randint(len(centres), (len(rows),), generator=generator)]
        rows.copy_(F.normalize(rows, dim=1))
    return out


def full_matrix_baseline(queries: torch.Tensor, gallery: torch.Tensor, k: int):
    scores = queries @ gallery.T  # (Q, N): the memory the chunked search avoids
    return torch.topk(scores, k, dim=1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--baseline-gallery", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=16384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.3, help="per-coordinate noise around a centre")
    parser.add_argument("--half", action=argparse.BooleanOptionalAction, default=True,
                        help="also search a float16 copy of the gallery (half the storage)")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--faiss-train-size", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(args.clusters, args.dim, generator=generator) / args.dim ** 0.5
    gallery = clustered_unit_vectors(args.gallery, args.dim, centres, args.noise / args.dim ** 0.5, generator)
    queries = clustered_unit_vectors(args.queries, args.dim, centres, args.noise / args.dim ** 0.5, generator)
    print(f"gallery {tuple(gallery.shape)} float32 = {gallery.numel() * 4 / 2**30:.2f} GiB, queries "
          f"{tuple(queries.shape)}, k = {args.k}, chunk_size = {args.chunk_size}, torch threads = {args.threads}")
    rows = []

    def record(method, items, seconds, peak_mib, recall=None, note=""):
        rows.append({"method": method, "gallery": items, "seconds": seconds, "peak_mib": peak_mib,
                     "recall_at_k": recall, "note": note})
        shown = "" if recall is None else f" recall@{args.k} {recall:.4f}"
        print(f"  {method:<34} N={items:>9,}  {seconds:8.2f} s  {peak_mib:8.1f} MiB{shown}  {note}", flush=True)

    small = gallery[: args.baseline_gallery]
    (base_scores, base_indices), seconds, peak = measure(lambda: full_matrix_baseline(queries, small, args.k))
    record("full matrix + torch.topk", len(small), seconds, peak,
           note=f"scores matrix alone {args.queries * len(small) * 4 / 2**20:.0f} MiB")
    (_, indices), seconds, peak = measure(lambda: topk_search(queries, small, args.k, args.chunk_size))
    record("topk_search (chunked, exact)", len(small), seconds, peak, recall_at_k_vs_exact(indices, base_indices))
    del base_scores, base_indices

    (_, exact), seconds, peak = measure(lambda: topk_search(queries, gallery, args.k, args.chunk_size))
    record("topk_search (chunked, exact)", len(gallery), seconds, peak,
           note=f"full matrix would need {args.queries * len(gallery) * 4 / 2**30:.1f} GiB of scores: not run")
    if args.half:
        half_gallery = gallery.half()  # 0.5 GiB more while both exist
        (_, indices), seconds, peak = measure(lambda: topk_search(queries, half_gallery, args.k, args.chunk_size))
        record("topk_search, float16 storage", len(gallery), seconds, peak, recall_at_k_vs_exact(indices, exact),
               note="recall vs the float32 search")
        del half_gallery

    try:
        import faiss  # noqa: F401
    except ImportError:
        print("  FAISS: not installed in this environment (pip install faiss-cpu): flat and IVF rows skipped")
    else:
        faiss.omp_set_num_threads(args.threads)
        index, seconds, peak = measure(lambda: FaissIndex(gallery, "flat"))
        record("faiss IndexFlatIP: build", len(gallery), seconds, peak)
        (_, indices), seconds, peak = measure(lambda: index.search(queries, args.k))
        record("faiss IndexFlatIP: search", len(gallery), seconds, peak, recall_at_k_vs_exact(indices, exact))
        del index
        index, seconds, peak = measure(lambda: FaissIndex(gallery, "ivf", nlist=args.nlist,
                                                          train_size=args.faiss_train_size))
        record(f"faiss IVFFlat nlist={args.nlist}: train+add", len(gallery), seconds, peak)
        for nprobe in args.nprobe:
            index.nprobe = nprobe
            (_, indices), seconds, peak = measure(lambda: index.search(queries, args.k))
            record(f"faiss IVFFlat nprobe={nprobe}: search", len(gallery), seconds, peak,
                   recall_at_k_vs_exact(indices, exact))

    print("\n| method | gallery | seconds | peak extra MiB | recall@k vs exact | note |\n|---|---:|---:|---:|---:|---|")
    for row in rows:
        recall = "" if row["recall_at_k"] is None else f"{row['recall_at_k']:.4f}"
        print(f"| {row['method']} | {row['gallery']:,} | {row['seconds']:.2f} | {row['peak_mib']:.0f} | {recall} | "
              f"{row['note']} |")
    figures = {"arguments": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
