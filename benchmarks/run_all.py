"""Every benchmark in one run, each figure with its baseline measured in the same run (``make bench``).

    python benchmarks/run_all.py [--out benchmarks/results/cpu.json] [--skip-scale] [--only finetune ...]
                                 [--equivalence]

1. ``foundation.py``: feature extraction against the dense (matmul) FLOP limit; ``retrieval_metrics`` against a
   per-query argsort; training throughput on cached features.
2. ``losses.py``: each loss's forward+backward against a per-anchor loop formulation (checked equal first).
3. ``ddp_training.py --scaling``: training under torchrun, 1 process vs 2 (and 1 process with 2 threads).
4. ``scale.py``: a 1M-item gallery, chunked exact top-k against the full score matrix, FAISS flat and IVF.
5. ``finetune.py --profile``: fine-tuning on cached activations, the plain path against each change of the fast
   path (channels_last, bfloat16 autocast, ...), and where the step's time goes; with ``--equivalence`` also
   converged runs of the plain and the fast path (about 7 minutes more here).

The figures go to one JSON file with the environment (git revision, packages, CPU count) and the load average
before and after, because on a shared 2-core machine a busy neighbour changes every figure. ``--only`` runs
some parts and merges them into the existing file, each with its own ``run`` entry (date, revision, load). The book's
performance page (``notebooks/performance.ipynb``) reads these files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import ddp_training
import finetune
import foundation
import losses
import scale
import torch

from xmr.results import environment_info

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "cpu.json"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


PARTS = {"foundation": lambda args: foundation.main([]), "losses": lambda args: losses.main([]),
         "distributed": lambda args: ddp_training.main(["--scaling"]), "scale": lambda args: scale.main([]),
         "finetune": lambda args: finetune.main(["--profile"] + ["--equivalence"] * args.equivalence)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--skip-scale", action="store_true", help="leave out the 1M-item gallery (about 2 minutes)")
    parser.add_argument("--only", nargs="+", choices=sorted(PARTS), help="run these parts, merged into --out")
    parser.add_argument("--equivalence", action="store_true", help="finetune: also train plain and fast to a plateau")
    args = parser.parse_args(argv)
    started, load_before = time.perf_counter(), os.getloadavg()
    threads = torch.get_num_threads()
    run = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "cpu_model": cpu_model(), "environment": environment_info("cpu"), "load_average_before": load_before}
    names = args.only or [name for name in PARTS if not (args.skip_scale and name == "scale")]
    record = json.loads(args.out.read_text()) if args.only and args.out.exists() else dict(run)
    for name in names:
        part_started, part_load = time.perf_counter(), os.getloadavg()
        record[name] = PARTS[name](args)
        torch.set_num_threads(threads)  # scale.py runs on --threads
        if args.only:
            record[name]["run"] = {**run, "load_average_before": part_load, "load_average_after": os.getloadavg(),
                                   "wall_time_s": time.perf_counter() - part_started}
    if not args.only:
        record["load_average_after"] = os.getloadavg()
        record["wall_time_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s; load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after)")


if __name__ == "__main__":
    main()
