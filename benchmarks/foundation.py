"""Foundation benchmarks: feature extraction, evaluation and training throughput, each with its baseline.

    python benchmarks/foundation.py [--images 128] [--json out.json]

Prints one line per figure. Evaluation is compared with the VSE++ reference style (a per-query numpy argsort)
in the same run, so the ratio does not depend on the machine's speed that day.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch

from xmr.data import load_flickr8k
from xmr.data.paired import PairedFeatures
from xmr.encoders import DualEncoder, ImageBackbone, ProjectionHead, TextBackbone, Tower
from xmr.features import ExtractionSettings, FeatureCache, image_features, text_features
from xmr.losses import InfoNCELoss
from xmr.metrics import retrieval_metrics
from xmr.train import TrainConfig, fit


def naive_vsepp_ranks(sims: np.ndarray, captions_per_image: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The VSE++ evaluation loop (i2t and t2i in vsepp/evaluation.py): one full argsort per query."""
    num_images = sims.shape[0]
    i2t = np.zeros(num_images)
    for index in range(num_images):
        order = np.argsort(sims[index])[::-1]
        i2t[index] = min(np.where(order == j)[0][0] for j in range(captions_per_image * index,
                                                                   captions_per_image * index + captions_per_image))
    t2i = np.zeros(sims.shape[1])
    for caption in range(sims.shape[1]):
        order = np.argsort(sims[:, caption])[::-1]
        t2i[caption] = np.where(order == caption // captions_per_image)[0][0]
    return i2t, t2i


def timed(function, *args, repeats: int = 1):
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        value = function(*args)
        best = min(best, time.perf_counter() - started)
    return value, best


def bench_extraction(num_images: int) -> dict:
    split = load_flickr8k("test").subset(num_images)
    with tempfile.TemporaryDirectory() as directory:
        settings = ExtractionSettings(batch_size=64, progress=False, cache=FeatureCache(directory))
        image_backbone, text_backbone = ImageBackbone(), TextBackbone()
        _, image_seconds = timed(image_features, split, image_backbone, settings)
        _, text_seconds = timed(text_features, split, text_backbone, settings)
    return {"images_per_s": num_images / image_seconds, "captions_per_s": 5 * num_images / text_seconds}


def bench_evaluation(num_images: int) -> dict:
    sims = torch.randn(num_images, 5 * num_images, generator=torch.Generator().manual_seed(0))
    ours, seconds = timed(retrieval_metrics, sims, repeats=2)
    (i2t, t2i), naive_seconds = timed(naive_vsepp_ranks, sims.numpy())
    assert abs(ours["i2t_r1"] - 100 * np.mean(i2t < 1)) < 1e-6 and abs(ours["t2i_r10"] - 100 * np.mean(t2i < 10)) < 1e-6
    return {"seconds": seconds, "naive_seconds": naive_seconds, "speedup": naive_seconds / seconds}


def bench_training(num_images: int, batch_size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(0)
    data = PairedFeatures(torch.randn(num_images, 1280, generator=generator),
                          torch.randn(5 * num_images, 384, generator=generator))
    model = DualEncoder(Tower(ProjectionHead(1280, 128)), Tower(ProjectionHead(384, 128)), InfoNCELoss())
    result = fit(model, data, TrainConfig(epochs=2, batch_size=batch_size, device="cpu", progress=False))
    return {"pairs_per_s": result.pairs_per_second}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="Flickr8k test images for extraction")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    figures = {"torch_threads": torch.get_num_threads()}
    extraction = bench_extraction(args.images)
    print(f"feature extraction (EfficientNet-Lite0, CPU): {extraction['images_per_s']:.1f} images/s")
    print(f"feature extraction (all-MiniLM-L6-v2, CPU):   {extraction['captions_per_s']:.1f} captions/s")
    figures["extraction"] = extraction
    for size in (1000, 5000):
        evaluation = bench_evaluation(size)
        print(f"retrieval_metrics {size} x {5 * size}: {evaluation['seconds']:.3f} s; per-query argsort (VSE++) "
              f"{evaluation['naive_seconds']:.2f} s; speed-up x{evaluation['speedup']:.1f}")
        figures[f"evaluation_{size}"] = evaluation
    training = bench_training(6000)
    print(f"training on cached pooled features (linear heads, InfoNCE, batch 64): {training['pairs_per_s']:.0f} pairs/s")
    figures["training"] = training
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=1)


if __name__ == "__main__":
    main()
