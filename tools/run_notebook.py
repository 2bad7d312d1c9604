"""Execute notebooks with papermill, retrying the ones whose cells can hang rather than fail.

A notebook whose metadata has ``"xmr": {"retry": {"cell_timeout": S, "attempts": N}}`` runs with a per-cell
timeout of S seconds and up to N attempts; every other notebook runs once with a one-hour per-cell timeout.
The explorer needs it: after its widget cell, nbclient sometimes waits for ever for an ``execute_reply`` the
idle kernel never sends (intermittent; jupyter/nbclient#312), so its run would stall instead of failing.
``make notebooks`` runs the book this way (in place); ``tools/smoke_notebooks.py`` uses :func:`execute`.
Usage: ``python tools/run_notebook.py NOTEBOOK [NOTEBOOK ...]`` (each executed in place, from ``notebooks/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import papermill

DEFAULT_CELL_TIMEOUT = 3600  # seconds; a paper notebook's longest cell takes minutes


def retry_settings(path: Path) -> tuple[int, int]:
    """(per-cell timeout in seconds, attempts) from the notebook's ``xmr.retry`` metadata, else (3600, 1)."""
    retry = nbformat.read(path, as_version=4).metadata.get("xmr", {}).get("retry", {})
    return int(retry.get("cell_timeout", DEFAULT_CELL_TIMEOUT)), int(retry.get("attempts", 1))


def execute(source: Path, target: Path, cwd: Path, **options) -> nbformat.NotebookNode:
    """``papermill.execute_notebook`` with the notebook's retry settings; the last attempt's error propagates."""
    cell_timeout, attempts = retry_settings(source)
    for attempt in range(1, attempts + 1):
        try:
            return papermill.execute_notebook(str(source), str(target), cwd=str(cwd), execution_timeout=cell_timeout,
                                              **options)
        except TimeoutError:  # nbclient's CellTimeoutError; a cell's own exception is not retried
            if attempt == attempts:
                raise
            print(f"{source.name}: a cell timed out after {cell_timeout} s (attempt {attempt} of {attempts}); "
                  f"running it again", file=sys.stderr)
    raise AssertionError("unreachable")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        path = Path(name).resolve()
        print(f"papermill {name}")
        execute(path, path, path.parent, kernel_name="python3")
