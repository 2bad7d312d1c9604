"""Training throughput under torchrun, and its scaling from 1 to 2 processes.

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_training.py [--head mlp] [--json out.json]
    python benchmarks/ddp_training.py --scaling [--json out.json]

The first form is one run: :func:`xmr.train.fit` on synthetic cached features (1280-d image, 384-d text, as
EfficientNet-Lite0 and MiniLM give), InfoNCE on the global batch, DDP over the gloo (CPU) or NCCL (GPU) backend;
rank 0 reports pairs/s of the global batch. ``--scaling`` launches it with torchrun three times per head: 1
process x 1 thread (the baseline), 2 processes x 1 thread, and 1 process x 2 threads (the other way to use two
cores), and prints each throughput with its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SETTINGS = (("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1), ("1 process x 2 threads", 1, 2))


def train_once(head: str, images: int, epochs: int, batch_size: int) -> dict:
    """One fit in this process (a torchrun rank, or a plain run); returns what rank 0 measured."""
    from xmr import distributed
    from xmr.data.paired import PairedFeatures
    from xmr.encoders import DualEncoder, ProjectionHead, Tower
    from xmr.losses import InfoNCELoss
    from xmr.train import TrainConfig, fit

    distributed.setup_from_env()
    generator = torch.Generator().manual_seed(0)
    data = PairedFeatures(torch.randn(images, 1280, generator=generator),
                          torch.randn(5 * images, 384, generator=generator))
    torch.manual_seed(0)
    model = DualEncoder(Tower(ProjectionHead(1280, 256, head)), Tower(ProjectionHead(384, 256, head)), InfoNCELoss())
    result = fit(model, data, TrainConfig(max_epochs=epochs, batch_size=batch_size, device="cpu", progress=False,
                                          select_by=None))
    figures = {"world_size": distributed.world_size(), "threads": torch.get_num_threads(), "head": head,
               "batch_size": batch_size, "pairs_per_s": result.pairs_per_second, "final_loss": result.step_losses[-1]}
    distributed.cleanup()
    return figures


def launch(processes: int, threads: int, head: str, images: int, epochs: int, batch_size: int) -> dict:
    """Runs this file under torchrun with ``processes`` ranks of ``threads`` torch threads each."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "figures.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   __file__, "--head", head, "--images", str(images), "--epochs", str(epochs),
                   "--batch-size", str(batch_size), "--json", str(out)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(out.read_text())


def scaling(heads=("linear", "mlp"), images: int = 12000, epochs: int = 3, batch_size: int = 256) -> dict:
    print(f"distributed training (torchrun, gloo, InfoNCE on the global batch of {batch_size}):")
    rows = []
    for head in heads:
        baseline = None
        for label, processes, threads in SETTINGS:
            figures = launch(processes, threads, head, images, epochs, batch_size)
            baseline = baseline or figures["pairs_per_s"]
            rows.append({"setting": label, "processes": processes, **figures,
                         "speedup": figures["pairs_per_s"] / baseline})
            print(f"  {head} heads, {label}: {figures['pairs_per_s']:,.0f} pairs/s "
                  f"(x{figures['pairs_per_s'] / baseline:.2f})", flush=True)
    return {"rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling", action="store_true", help="launch 1 vs 2 processes and compare")
    parser.add_argument("--head", choices=("linear", "mlp"), default="mlp")
    parser.add_argument("--images", type=int, default=12000, help="synthetic training images (5 captions each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch")
    parser.add_argument("--json", help="write the figures to this file (rank 0)")
    args = parser.parse_args(argv)
    if args.scaling:
        figures = scaling(images=args.images, epochs=args.epochs, batch_size=args.batch_size)
    else:
        figures = train_once(args.head, args.images, args.epochs, args.batch_size)
        if int(os.environ.get("RANK", 0)) != 0:
            return figures
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
