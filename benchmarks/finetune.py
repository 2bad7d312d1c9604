"""Fine-tuning on cached activations (issue #18): pairs/s of ``fit``'s step loop before and after each change.

    python benchmarks/finetune.py [--pairs 192] [--repeats 2] [--profile] [--equivalence] [--json out.json]

Three configurations, batch 64, InfoNCE, linear heads to 128-d: EfficientNet-Lite0's top stage trainable on the
cached (N, 192, 7, 7) activations below it (frozen pooled text), MiniLM's top layer trainable on the cached
(5N, L, 384) token states below it (frozen pooled images), and both. Each runs ``fit`` for one epoch of
``--pairs`` pairs per change, cumulatively: the plain path (float16 cache, default layout, float32), then
``channels_last`` (configurations with a convolution), ``mixed_precision_cpu`` (bfloat16 autocast), the inputs
stored as float32 (no per-batch ``.float()``), a caption batch cut to its longest caption
(:func:`xmr.encoders.trim_padding`, always on outside this benchmark; configurations with captions) and all of
it on one thread. The changes are timed in turns, ``--repeats`` times, and each keeps its best, so a busy
neighbour slows all of them alike. The share of the dense limit is the FLOPs of a float32 step (3x the
forward's, ``foundation.forward_flops``; after the cut, of the shorter batches) times the throughput
over ``foundation.matmul_flops_per_s`` at the same thread count. The inputs are the cached Flickr8k train
activations where the cache holds them (``~/.cache/xmr``, read only), otherwise random tensors of their shapes;
the frozen side is random. ``--equivalence`` (minutes) trains the image top stage and the text top layer to a
plateau on a Flickr8k subset, plain and fast, for three seeds, and puts an interval on the gap of their test Rsum.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from unittest import mock

import torch
from foundation import forward_flops, matmul_flops_per_s

from xmr.data.paired import PairedFeatures
from xmr.encoders import DualEncoder, ImageBackbone, ProjectionHead, TextBackbone, Tower
from xmr.features import FeatureCache
from xmr.losses import InfoNCELoss
from xmr.train import TrainConfig, fit, training_autocast

BATCH = 64
CONFIGURATIONS = {"image top stage": (1, 0), "text top layer": (0, 1), "both tops": (1, 1)}


@dataclasses.dataclass(frozen=True)
class Change:
    name: str
    options: dict
    float32_inputs: bool = False
    threads: int | None = None
    needs_convolution: bool = False
    needs_mask: bool = False
    trim_padding: bool = True


FAST = {"channels_last": True, "mixed_precision_cpu": True}
CHANGES = (Change("baseline", {}, trim_padding=False),
           Change("+channels_last", {"channels_last": True}, needs_convolution=True, trim_padding=False),
           Change("+bf16 autocast", FAST, trim_padding=False),
           Change("+float32 inputs", FAST, float32_inputs=True, trim_padding=False),
           Change("+trim padding", FAST, float32_inputs=True, needs_mask=True),
           Change("+1 thread", FAST, float32_inputs=True, threads=1))


def cached_lower(backbone: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The largest cached Flickr8k train entry of activations below a top of 1 (and its mask), memory-mapped
    and checked against its digests (:meth:`xmr.features.FeatureCache.load`), or ``(None, None)``."""
    cache = FeatureCache()
    entries = []
    for path in cache.directory.glob(f"flickr8k-train-{backbone}-below_top1-*.pt"):
        key = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["key"]
        entries.append((key["count"], key))
    if not entries:
        return None, None
    tensors = cache.load(max(entries, key=lambda entry: entry[0])[1])
    return (None, None) if tensors is None else (tensors["lower"], tensors.get("mask"))


def inputs(image_top: int, text_top: int, pairs: int, generator: torch.Generator) -> tuple[dict, str]:
    """``PairedFeatures`` arguments for ``pairs`` images, and where the trainable side's inputs came from."""
    source = []
    image, text, mask = torch.randn(pairs, 1280, generator=generator), None, None
    if image_top:
        lower, _ = cached_lower(ImageBackbone.name)
        source.append("cached" if lower is not None else "random")
        image = lower[:pairs] if lower is not None else torch.randn(pairs, 192, 7, 7, generator=generator).half()
    if text_top:
        text, mask = cached_lower(TextBackbone.name)
        source.append("cached" if text is not None else "random")
        if text is None:
            text = torch.randn(5 * pairs, 42, 384, generator=generator).half()
            mask = (torch.arange(42) < torch.randint(8, 43, (5 * pairs, 1), generator=generator)).long()
        text, mask = text[: 5 * pairs], mask[: 5 * pairs]
    else:
        text = torch.randn(5 * pairs, 384, generator=generator)
    return {"image": image, "text": text, "text_mask": mask}, "+".join(source)


def build(image_top: int, text_top: int) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(Tower(ProjectionHead(1280, 128), ImageBackbone(image_top) if image_top else None),
                       Tower(ProjectionHead(384, 128), TextBackbone(text_top) if text_top else None), InfoNCELoss())


def step_flops(model: DualEncoder, data: PairedFeatures, trim_padding: bool) -> float:
    """FLOPs of a training step, the mean over ``data``'s batches: 3x the forward's (input and weight gradients
    cost a forward each). The flop counter's own count of ``convolution_backward`` treats a depthwise convolution
    as a dense one (x13 here). With ``trim_padding`` a caption batch runs on its longest caption."""
    batches = list(torch.utils.data.DataLoader(data, batch_size=BATCH))
    with padding(trim_padding):
        return sum(3 * forward_flops(model.train().training_losses, batch) for batch in batches) / len(batches)


def dense_limit(threads: int) -> float:
    """``foundation.matmul_flops_per_s`` on ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return matmul_flops_per_s()
    finally:
        torch.set_num_threads(previous)


def padding(trim: bool):
    """The context of a change's runs: before "+trim padding" ``Tower`` keeps a batch's unused padding."""
    return contextlib.nullcontext() if trim else mock.patch("xmr.encoders.trim_padding", lambda *inputs: inputs)


def epoch_pairs_per_s(model: DualEncoder, data: PairedFeatures, change: Change) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(change.threads or threads)
    try:
        config = TrainConfig(max_epochs=1, batch_size=BATCH, device="cpu", progress=False, **change.options)
        with padding(change.trim_padding):
            return fit(model, data, config).pairs_per_second
    finally:
        torch.set_num_threads(threads)
        model.to(memory_format=torch.contiguous_format)  # the next change starts from the default layout


def profile(model: DualEncoder, data: PairedFeatures, change: Change, steps: int = 3, rows: int = 6) -> list[dict]:
    """The operators taking most of the self CPU time over ``steps`` training steps of ``change``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    if change.options.get("channels_last"):
        model.to(memory_format=torch.channels_last)
    config = TrainConfig(**change.options)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [torch.utils.data.default_collate([data[i] for i in range(start, start + BATCH)])
               for start in range(0, min(steps * BATCH, len(data) - BATCH + 1), BATCH)]
    with padding(change.trim_padding), torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches:
            with training_autocast(config, torch.device("cpu")):
                loss = model.training_losses(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.to(memory_format=torch.contiguous_format)
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": event.key, "share": event.self_cpu_time_total / total} for event in top]


def equivalence(seeds=(0, 1, 2), train_images: int = 1000, max_epochs: int = 30, lr: float = 1e-3) -> dict:
    """Test metrics of ``run_dual_encoder`` (InfoNCE) with EfficientNet-Lite0's top stage trainable (pooled text),
    and with MiniLM's top layer trainable (pooled images), on the first ``train_images`` Flickr8k train images,
    each trained until its dev Rsum stops improving (patience 2), plain and with the fast path, per seed; and
    :func:`xmr.claims.compare`'s interval on fast - plain test Rsum (seeds and test queries)."""
    from xmr.claims import compare
    from xmr.experiment import DualEncoderSettings, run_dual_encoder
    from xmr.features import load_caption_inputs

    figures = {"train_images": train_images, "threads": torch.get_num_threads(), "lr": lr, "runs": [],
               "comparisons": {}}
    for name, (image_top, text_top) in {"image top stage": (1, 0), "text top layer": (0, 1)}.items():
        splits = {split: load_caption_inputs(split, image_top, text_top) for split in ("train", "dev", "test")}
        train = splits["train"]
        captions = train_images * train.captions_per_image
        train = dataclasses.replace(train, image=train.image[:train_images], text=train.text[:captions],
                                    text_mask=None if train.text_mask is None else train.text_mask[:captions])
        records = {"plain": [], "fast": []}
        for seed in seeds:
            for path, options in (("plain", {}), ("fast", FAST)):
                config = TrainConfig(max_epochs=max_epochs, patience=2, lr=lr, seed=seed, device="cpu",
                                     progress=False, **options)
                outcome = run_dual_encoder(DualEncoderSettings(image_top=image_top, text_top=text_top), config,
                                           train, splits["dev"], splits["test"])
                training = outcome.training
                records[path].append({"run_name": f"{path}-seed{seed}", "metrics": outcome.test_metrics,
                                      "training": outcome.training_record(), "per_query": outcome.per_query})
                figures["runs"].append({"configuration": name, "path": path, "seed": seed,
                                        "rsum": outcome.test_metrics["rsum"], "best_epoch": training.best_epoch,
                                        "epochs_run": training.epochs_run, "stopped_by": training.stopped_by,
                                        "pairs_per_s": training.pairs_per_second})
                print(figures["runs"][-1], flush=True)
        figures["comparisons"][name] = compare(records["fast"], records["plain"], "rsum").as_dict()
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=192, help="pairs of one timed epoch (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile the plain and fast steps")
    parser.add_argument("--equivalence", action="store_true", help="also train plain and fast to a plateau")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    limits = {count: dense_limit(count) for count in sorted({threads, *(c.threads for c in CHANGES if c.threads)})}
    figures = {"torch_threads": threads, "batch_size": BATCH, "pairs_per_epoch": args.pairs,
               "dense_limit_flops_per_s": {str(count): limit for count, limit in limits.items()}, "configurations": {}}
    generator = torch.Generator().manual_seed(0)
    for name, (image_top, text_top) in CONFIGURATIONS.items():
        arguments, source = inputs(image_top, text_top, args.pairs, generator)
        model = build(image_top, text_top)
        changes = [change for change in CHANGES
                   if (image_top or not change.needs_convolution) and (text_top or not change.needs_mask)]
        datasets = {}
        for change in changes:
            tensors = {key: value.float() if change.float32_inputs and value is not None and value.is_floating_point()
                       else value for key, value in arguments.items()}
            datasets[change.name] = PairedFeatures(tensors["image"], tensors["text"], tensors["text_mask"])
        flops = {trim: step_flops(model, datasets["baseline"], trim) for trim in (False, True)}
        epoch_pairs_per_s(model, PairedFeatures(*arguments.values()), CHANGES[0])  # warm-up: allocations
        best = {change.name: 0.0 for change in changes}
        for _ in range(args.repeats):
            for change in changes:
                best[change.name] = max(best[change.name], epoch_pairs_per_s(model, datasets[change.name], change))
        rows = [{"change": change.name, "options": change.options, "threads": change.threads or threads,
                 "pairs_per_s": best[change.name], "speedup": best[change.name] / best["baseline"],
                 "dense_limit_share": (best[change.name] * flops[change.trim_padding] / BATCH
                                       / limits[change.threads or threads])}
                for change in changes]
        entry = {"inputs": source, "step_flops": flops[False], "trimmed_step_flops": flops[True], "rows": rows}
        if args.profile:
            entry["profile"] = {label: profile(model, datasets[change.name], change)
                                for label, change in (("plain", changes[0]), ("fast", changes[-2]))}
        figures["configurations"][name] = entry
        for row in rows:
            print(f"{name} ({source} inputs), {row['change']}: {row['pairs_per_s']:.0f} pairs/s "
                  f"(x{row['speedup']:.2f}), {100 * row['dense_limit_share']:.1f}% of the dense limit", flush=True)
    if args.equivalence:
        figures["equivalence"] = equivalence()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    main()
