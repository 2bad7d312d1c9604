"""One JSON file per run, one claims file per paper: what was run, what it measured, and the verdicts.

The book's tables are built from these files (:func:`load_results`, :func:`load_runs`, :func:`load_claims`),
never typed by hand. Both kinds follow a JSON Schema (``xmr/schema/``; version 2) that the test suite checks
every committed file against. A *run* file holds the paper id, the parameters, the dataset and split, the test
metrics, the ``training`` record (epoch budget, epochs run, best epoch, whether the run stopped on a plateau or
by its budget), the ``per_query`` outcomes the metrics come from (so a claim can be re-judged without training),
the history and the environment. A *claims* file holds a paper's verdicts (:mod:`xmr.claims`). Files are
written atomically; a loader names the file on any malformed input.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from .io import atomic_write

RESULT_SCHEMA_VERSION = 2
PAPER_IDS = ("timofeev2022", "coder2022", "icone2024", "drcl2024", "shi2024")
COMPARISON_ID = "comparison"  # the cross-paper comparison's result files (notebooks/comparison.ipynb)
REPORTED_PACKAGES = ("xmr", "torch", "torchvision", "transformers", "timm", "numpy", "scipy", "scikit-learn")
REPOSITORY = Path(__file__).resolve().parents[1]
SCHEMA_DIR = Path(__file__).with_name("schema")
IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class ResultFileError(ValueError):
    """A result or claims file is missing, malformed or disagrees with the schema; the message names it."""


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


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not IDENTIFIER.match(value) or ".." in value:
        raise ValueError(f"{what} must be a plain name (letters, digits, '_', '-', '.'; no separators), got {value!r}")


def _write_json(path: Path, record: dict, compact: tuple[str, ...] = ()) -> Path:
    """Write ``record`` atomically, indented, except the keys in ``compact`` (long per-query lists) on one line."""
    text = json.dumps({k: v for k, v in record.items() if k not in compact}, indent=1, allow_nan=False)
    tail = "".join(f',\n "{key}": {json.dumps(record[key], separators=(",", ":"), allow_nan=False)}'
                   for key in compact if key in record)
    text = text[:-2] + tail + "\n}\n"
    atomic_write(path, lambda file: file.write(text), mode="w")
    return path


def closed_form_training(wall_time_s: float | None = None) -> dict:
    """The ``training`` record of a method without stochastic training (CCA): its seed variance is zero."""
    return {"epochs_budget": 0, "epochs_run": 0, "best_epoch": None, "stopped_by": "closed_form",
            "wall_time_s": wall_time_s}


def staged_training(stages: dict[str, dict]) -> dict:
    """One ``training`` record for a run of several stages (``{stage name: TrainResult.record()}``): it is
    budget-limited when any stage is."""
    if not stages:
        raise ValueError("staged_training needs at least one stage")
    stopped = [stage["stopped_by"] for stage in stages.values()]
    return {"epochs_budget": sum(stage["epochs_budget"] for stage in stages.values()),
            "epochs_run": sum(stage["epochs_run"] for stage in stages.values()), "best_epoch": None,
            "stopped_by": "budget" if "budget" in stopped else ("plateau" if "plateau" in stopped else "closed_form"),
            "wall_time_s": sum(stage.get("wall_time_s") or 0.0 for stage in stages.values()),
            "stages": dict(stages)}


def write_result(results_dir: str | Path, paper_id: str, run_name: str, *, parameters: dict, dataset: str,
                 split: str, metrics: dict, training: dict, per_query: dict, history: list | None = None,
                 device: torch.device | str | None = None, extra: dict | None = None) -> Path:
    """Write the run file ``<results_dir>/<paper_id>/<run_name>.json`` (schema version 2) and return its path."""
    _check_name(paper_id, "paper_id")
    _check_name(run_name, "run_name")
    record = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "kind": "run",
        "paper_id": paper_id,
        "run_name": run_name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset,
        "split": split,
        "parameters": _jsonable(parameters),
        "metrics": _jsonable(metrics),
        "training": _jsonable(training),
        "history": _jsonable(history or []),
        "environment": environment_info(device),
        **_jsonable(extra or {}),
        "per_query": _jsonable(per_query),
    }
    validate_record(record, f"{paper_id}/{run_name}")
    return _write_json(Path(results_dir) / paper_id / f"{run_name}.json", record, compact=("per_query",))


def write_claims(results_dir: str | Path, paper_id: str, run_name: str, claims: list[dict],
                 parameters: dict | None = None) -> Path:
    """Write a paper's claims file (``Verdict.as_row()`` of each claim, :mod:`xmr.claims`)."""
    _check_name(paper_id, "paper_id")
    _check_name(run_name, "run_name")
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {"schema_version": RESULT_SCHEMA_VERSION, "kind": "claims", "paper_id": paper_id,
              "run_name": run_name, "created": created,
              "parameters": _jsonable(parameters or {}), "claims": _jsonable(claims),
              "environment": environment_info()}
    validate_record(record, f"{paper_id}/{run_name}")
    return _write_json(Path(results_dir) / paper_id / f"{run_name}.json", record)


def validate_record(record: dict, origin: str | Path) -> dict:
    """Check ``record`` against its JSON Schema (``xmr/schema/<kind>.schema.json``); raise
    :class:`ResultFileError` naming ``origin`` and the first offending field."""
    import jsonschema

    if not isinstance(record, dict):
        raise ResultFileError(f"{origin}: a result file must hold a JSON object, got {type(record).__name__}")
    if record.get("schema_version") != RESULT_SCHEMA_VERSION:
        raise ResultFileError(f"{origin}: schema_version {record.get('schema_version')!r}, expected "
                              f"{RESULT_SCHEMA_VERSION}: re-run the notebook that wrote it")
    kind = record.get("kind")
    if kind not in ("run", "claims"):
        raise ResultFileError(f"{origin}: 'kind' must be 'run' or 'claims', got {kind!r}")
    error = jsonschema.exceptions.best_match(_validator(kind).iter_errors(record))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        raise ResultFileError(f"{origin}: {where}: {error.message}")
    return record


_VALIDATORS: dict = {}


def _validator(kind: str):
    import jsonschema

    if kind not in _VALIDATORS:
        schema = json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text())
        _VALIDATORS[kind] = jsonschema.Draft202012Validator(schema)
    return _VALIDATORS[kind]


def read_record(path: str | Path) -> dict:
    """One result or claims file, validated; any problem raises :class:`ResultFileError` naming the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ResultFileError(f"{path}: no such result file") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultFileError(f"{path}: not valid JSON ({error}); delete it and re-run the notebook that wrote "
                              "it") from error
    validate_record(record, path)
    if (record["paper_id"], record["run_name"]) != (path.parent.name, path.stem):
        raise ResultFileError(f"{path}: holds {record['paper_id']}/{record['run_name']}, which disagrees with "
                              "its file name")
    return record


def load_results(results_dir: str | Path, paper_id: str | None = None, prefix: str = "") -> list[dict]:
    """Every run record under ``results_dir`` (optionally one paper's, optionally only run names starting with
    ``prefix``), sorted by paper and run name. Claims files are left out; a malformed file raises."""
    if paper_id is not None:
        _check_name(paper_id, "paper_id")
    pattern = f"{paper_id}/{prefix}*.json" if paper_id else f"*/{prefix}*.json"
    records = [read_record(path) for path in sorted(Path(results_dir).glob(pattern))]
    return sorted((r for r in records if r["kind"] == "run"), key=lambda r: (r["paper_id"], r["run_name"]))


def load_runs(results_dir: str | Path, paper_id: str, run_names) -> list[dict]:
    """The run records named ``run_names`` (in that order); fails naming every one that is missing, so a
    seed the notebook asked for is never averaged away."""
    _check_name(paper_id, "paper_id")
    names = list(run_names)
    missing = [name for name in names if not (Path(results_dir) / paper_id / f"{name}.json").exists()]
    if missing:
        raise ResultFileError(f"{Path(results_dir) / paper_id}: missing run file(s) {missing}; run the notebook "
                              f"that writes them (or ask only for the seeds that were run)")
    records = [read_record(Path(results_dir) / paper_id / f"{name}.json") for name in names]
    for name, record in zip(names, records):
        if record["kind"] != "run":
            raise ResultFileError(f"{paper_id}/{name}: is a {record['kind']} file, not a run file")
    return records


def load_claims(results_dir: str | Path, run_name: str = "cpu_claims") -> list[dict]:
    """Every paper's claims rows from its claims file ``<paper_id>/<run_name>.json``, with ``paper_id`` added."""
    rows = []
    for path in sorted(Path(results_dir).glob(f"*/{run_name}.json")):
        record = read_record(path)
        if record["kind"] != "claims":
            raise ResultFileError(f"{path}: is a {record['kind']} file, not a claims file")
        rows.extend({"paper_id": record["paper_id"], **row} for row in record["claims"])
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
