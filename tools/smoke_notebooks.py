"""Regenerate the smoke-mode reference notebooks that nbval checks (``tests/smoke_notebooks/<paper_id>.ipynb``).

Each paper notebook that has ``notebooks/params/<paper_id>_smoke.yaml`` is executed by papermill with those
parameters (results go to ``_build/smoke-results/``), then every output is dropped except those of the cells
tagged ``nbval-check-output`` (dataset statistics, seeded smoke metrics): those are the outputs nbval compares
strictly on the next run; the other cells must only run without error. Run it (``make smoke-notebooks``) after
changing a notebook: ``tests/test_notebooks.py`` fails while a reference's code differs from its notebook's.
Usage: ``python tools/smoke_notebooks.py [paper_id ...]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml
from run_notebook import execute

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
REFERENCES = REPO / "tests" / "smoke_notebooks"
RESULTS_DIR = "~/.cache/xmr/smoke-results"  # outside the repository: smoke runs never publish into results/
CHECKED = "nbval-check-output"


def smoke_parameters(paper_id: str) -> dict:
    parameters = yaml.safe_load((NOTEBOOKS / "params" / f"{paper_id}_smoke.yaml").read_text())
    return {**parameters, "RESULTS_DIR": RESULTS_DIR, "DATA_ROOT": ""}  # "" = $XMR_DATA


def paper_ids() -> list[str]:
    return sorted(path.stem for path in NOTEBOOKS.glob("*.ipynb")
                  if (NOTEBOOKS / "params" / f"{path.stem}_smoke.yaml").exists())


def regenerate(paper_id: str) -> Path:
    REFERENCES.mkdir(parents=True, exist_ok=True)
    target = REFERENCES / f"{paper_id}.ipynb"
    executed = execute(NOTEBOOKS / f"{paper_id}.ipynb", target, REFERENCES, parameters=smoke_parameters(paper_id),
                       kernel_name="python3", progress_bar=False)
    for cell in executed.cells:
        if cell.cell_type == "code" and CHECKED not in cell.metadata.get("tags", []):
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    executed.metadata.pop("papermill", None)
    nbformat.write(executed, target)
    return target


if __name__ == "__main__":
    for paper_id in sys.argv[1:] or paper_ids():
        print(f"smoke reference: {regenerate(paper_id).relative_to(REPO)}")
