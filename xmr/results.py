"""One JSON file per run: what was run, on what, what it measured, and the environment it ran in.

The book's tables are built from these files (:func:`load_results`), never typed by hand. A result file
holds the paper id, the run's parameters, the dataset and split, the metrics, the training history, and the
environment (package versions, device, git revision, wall time). Files are written atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import torch

RESULT_SCHEMA_VERSION = 1
PAPER_IDS = ("timofeev2022", "coder2022", "icone2024", "drcl2024", "shi2024")
COMPARISON_ID = "comparison"  # the cross-paper comparison's result files (notebooks/comparison.ipynb)
REPORTED_PACKAGES = ("xmr", "torch", "torchvision", "transformers", "timm", "numpy", "scipy", "scikit-learn")
REPOSITORY = Path(__file__).resolve().parents[1]


def git_revision(directory: Path = REPOSITORY) -> str | None:
    """The commit the code ran at, with ``-dirty`` when the working tree had uncommitted changes."""
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                                  check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return revision + ("-dirty" if dirty else "")


def environment_info(device: torch.device | str | None = None) -> dict:
    """Package versions, Python, platform, CPU count, device (GPU name when CUDA) and git revision."""
    versions = {}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = torch.device(device) if device is not None else None
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "device": str(device) if device is not None else None,
        "git_revision": git_revision(),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _jsonable(value):
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def write_result(results_dir: str | Path, paper_id: str, run_name: str, *, parameters: dict, dataset: str,
                 split: str, metrics: dict, history: list | None = None, wall_time_s: float | None = None,
                 device: torch.device | str | None = None, extra: dict | None = None) -> Path:
    """Write ``<results_dir>/<paper_id>/<run_name>.json`` and return its path."""
    if paper_id not in (*PAPER_IDS, COMPARISON_ID) and not paper_id.startswith("test"):
        raise ValueError(f"unknown paper id {paper_id!r}; expected one of {PAPER_IDS} or {COMPARISON_ID!r}")
    if not run_name or any(c in run_name for c in "/\\ "):
        raise ValueError(f"run_name must be a non-empty file stem without slashes or spaces, got {run_name!r}")
    record = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "paper_id": paper_id,
        "run_name": run_name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset,
        "split": split,
        "parameters": _jsonable(parameters),
        "metrics": _jsonable(metrics),
        "history": _jsonable(history or []),
        "wall_time_s": wall_time_s,
        "environment": environment_info(device),
        **_jsonable(extra or {}),
    }
    path = Path(results_dir) / paper_id / f"{run_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w") as file:
        json.dump(record, file, indent=1, allow_nan=False)
        file.write("\n")
    os.replace(temporary, path)
    return path


def load_results(results_dir: str | Path, paper_id: str | None = None) -> list[dict]:
    """Every result record under ``results_dir`` (optionally one paper's), sorted by paper and run name."""
    pattern = f"{paper_id}/*.json" if paper_id else "*/*.json"
    records = [json.loads(path.read_text()) for path in sorted(Path(results_dir).glob(pattern))]
    return sorted(records, key=lambda record: (record["paper_id"], record["run_name"]))


def load_claims(results_dir: str | Path, run_name: str = "cpu_summary") -> list[dict]:
    """Each paper's claims as its notebook's summary result file (``<paper_id>/<run_name>.json``) records them.

    The notebooks word their claim tables differently; this reads them into one schema: ``paper_id``,
    ``claim``, ``paper`` (the paper's figure, "" when the notebook gives none), ``ours`` (what we measured) and
    ``verdict`` ("held", "not held", or the notebook's own word, e.g. "within noise").
    """
    rows = []
    for path in sorted(Path(results_dir).glob(f"*/{run_name}.json")):
        record = json.loads(path.read_text())
        claims = record.get("claims") or record["metrics"].get("claims") or []
        for claim in claims:
            paper = next((value for key, value in claim.items() if key.startswith(("paper", "report"))), "")
            ours = next(value for key, value in claim.items() if key.startswith("ours"))
            verdict = claim["verdict"] if "verdict" in claim else ("held" if claim["held"] else "not held")
            rows.append({"paper_id": record["paper_id"], "claim": claim["claim"], "paper": str(paper),
                         "ours": str(ours), "verdict": verdict})
    return rows


def paper_numbers(paper_id: str) -> dict:
    """The numbers a paper reports, with table and section references (``xmr/paper_numbers/<paper_id>.json``)."""
    path = Path(__file__).with_name("paper_numbers") / f"{paper_id}.json"
    if not path.exists():
        known = sorted(file.stem for file in path.parent.glob("*.json"))
        raise KeyError(f"no reported numbers for {paper_id!r}; have {known}")
    return json.loads(path.read_text())


def mean_and_spread(frame, by: str, columns, digits: int = 1):
    """A table of ``"mean ± std"`` strings per group of ``by`` (std over runs, ddof=1; the mean alone for one run)."""
    import pandas as pd

    grouped = frame.groupby(by, sort=False)[list(columns)]
    mean, spread, count = grouped.mean(), grouped.std(ddof=1), grouped.count()

    def cell(m: float, s: float, n: int) -> str:
        return f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"

    return pd.DataFrame({column: [cell(m, s, n) for m, s, n in zip(mean[column], spread[column], count[column])]
                         for column in columns}, index=mean.index)
