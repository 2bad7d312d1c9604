"""Foundation benchmarks: feature extraction, evaluation and training throughput, each with its baseline.

    python benchmarks/foundation.py [--images 128] [--json out.json]

Prints one line per figure. Evaluation is compared with the VSE++ reference style (a per-query numpy argsort)
in the same run, so the ratio does not depend on the machine's speed that day. Feature extraction is compared
with the machine's dense limit measured in the same run: the FLOPs of one forward pass (counted by
``torch.utils.flop_counter``) times the throughput, against the FLOP rate of a large float32 matmul.
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


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """The practical dense limit of this CPU: FLOP/s of a float32 (size x size) @ (size x size) matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    _, seconds = timed(torch.matmul, a, b, repeats=repeats)
    return 2 * size**3 / seconds


@torch.no_grad()
def forward_flops(function, *args, **kwargs) -> int:
    """FLOPs of one call, as torch.utils.flop_counter counts them (matmuls and convolutions, 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function(*args, **kwargs)
    return counter.get_total_flops()


def bench_extraction(num_images: int) -> dict:
    split = load_flickr8k("test").subset(num_images)
    with tempfile.TemporaryDirectory() as directory:
        settings = ExtractionSettings(batch_size=64, progress=False, cache=FeatureCache(directory))
        image_backbone, text_backbone = ImageBackbone(), TextBackbone()
        _, image_seconds = timed(image_features, split, image_backbone, settings)
        _, text_seconds = timed(text_features, split, text_backbone, settings)
    image_flops = forward_flops(image_backbone.eval(), torch.zeros(1, 3, 224, 224))
    captions = list(split.captions)  # counted in the extraction's batches of 64, each padded to its longest caption
    text_flops = sum(forward_flops(text_backbone.eval(), **text_backbone.tokenize(captions[start : start + 64]))
                     for start in range(0, len(captions), 64)) / len(captions)
    return {"images_per_s": num_images / image_seconds, "captions_per_s": 5 * num_images / text_seconds,
            "image_flops": image_flops, "caption_flops": text_flops}


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
    result = fit(model, data, TrainConfig(max_epochs=2, batch_size=batch_size, device="cpu", progress=False))
    return {"pairs_per_s": result.pairs_per_second}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="Flickr8k test images for extraction")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = {"torch_threads": torch.get_num_threads()}
    extraction = bench_extraction(args.images)
    limit = matmul_flops_per_s()
    print(f"dense limit (float32 2048^3 matmul): {limit / 1e9:.1f} GFLOP/s")
    extractors = (("EfficientNet-Lite0", extraction["images_per_s"], extraction["image_flops"], "images"),
                  ("all-MiniLM-L6-v2", extraction["captions_per_s"], extraction["caption_flops"], "captions"))
    for name, rate, flops, unit in extractors:
        achieved = rate * flops
        print(f"feature extraction ({name}, CPU): {rate:.1f} {unit}/s x {flops / 1e9:.3f} GFLOP = "
              f"{achieved / 1e9:.1f} GFLOP/s, {100 * achieved / limit:.0f}% of the dense limit")
    figures["extraction"] = {**extraction, "dense_limit_flops_per_s": limit}
    for size in (1000, 5000):
        evaluation = bench_evaluation(size)
        print(f"retrieval_metrics {size} x {5 * size}: {evaluation['seconds']:.3f} s; per-query argsort (VSE++) "
              f"{evaluation['naive_seconds']:.2f} s; speed-up x{evaluation['speedup']:.1f}")
        figures[f"evaluation_{size}"] = evaluation
    training = bench_training(6000)
    print(f"training on cached pooled features (linear heads, InfoNCE, batch 64): "
          f"{training['pairs_per_s']:.0f} pairs/s")
    figures["training"] = training
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=1)
    return figures


if __name__ == "__main__":
    main()
