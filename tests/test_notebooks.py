"""Every paper notebook is papermill-ready and has a current smoke reference for nbval.

The smoke references (``tests/smoke_notebooks/<paper_id>.ipynb``, written by ``tools/smoke_notebooks.py``) are
the notebooks executed with their smoke parameters. ``make test`` runs them with nbval (``--nbval-lax``): every
cell must run, and the cells tagged ``nbval-check-output`` (dataset statistics, seeded smoke metrics, the
result files written) must reproduce their saved outputs, after ``tests/nbval_sanitize.cfg``.
"""
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from smoke_notebooks import CHECKED, NOTEBOOKS, REFERENCES, paper_ids  # noqa: E402

PAPER_IDS = paper_ids()


PRESENTATION_TAGS = {f"{action}-{part}" for action in ("hide", "remove") for part in ("input", "output", "cell")}


def code_cells(notebook: nbformat.NotebookNode) -> list[tuple[str, list[str]]]:
    """(source, tags) of each code cell, without papermill's injected-parameters cell; the book's presentation
    tags (hide-input, remove-cell, ...) change nothing nbval runs or checks, so they are left out."""
    return [(cell.source, sorted(set(cell.metadata.get("tags", [])) - PRESENTATION_TAGS)) for cell in notebook.cells
            if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", [])]


def test_every_notebook_has_smoke_parameters_and_one_parameters_cell():
    assert PAPER_IDS, "no notebook with a smoke parameter file"
    for path in NOTEBOOKS.glob("*.ipynb"):
        cells = nbformat.read(path, as_version=4).cells
        tagged = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
        assert path.stem in PAPER_IDS, f"{path.name} has no params/{path.stem}_smoke.yaml"


@pytest.mark.parametrize("paper_id", PAPER_IDS)
def test_smoke_reference_is_current(paper_id):
    reference_path = REFERENCES / f"{paper_id}.ipynb"
    assert reference_path.exists(), f"run `python tools/smoke_notebooks.py {paper_id}`"
    notebook = nbformat.read(NOTEBOOKS / f"{paper_id}.ipynb", as_version=4)
    reference = nbformat.read(reference_path, as_version=4)
    assert code_cells(reference) == code_cells(notebook), (
        f"{reference_path.name} is stale: run `python tools/smoke_notebooks.py {paper_id}`")
    checked = [cell for cell in reference.cells if CHECKED in cell.metadata.get("tags", [])]
    assert checked and all(cell.outputs for cell in checked), "no strictly checked output to compare"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _run_smoke(paper_id: str, output: Path, **overrides):
    import papermill
    from smoke_notebooks import smoke_parameters

    return papermill.execute_notebook(str(NOTEBOOKS / f"{paper_id}.ipynb"), str(output),
                                      parameters={**smoke_parameters(paper_id), **overrides}, cwd=str(NOTEBOOKS),
                                      kernel_name="python3", progress_bar=False, execution_timeout=600)


@pytest.fixture
def results_copy(tmp_path) -> Path:
    """A copy of the book's results/, for runs that must leave it byte-identical."""
    import shutil

    return Path(shutil.copytree(REPO / "results", tmp_path / "results"))


@pytest.mark.parametrize("paper_id", PAPER_IDS)
def test_a_misspelt_parameter_stops_the_run_before_any_work(paper_id, results_copy, tmp_path):
    """`papermill -p EPOCH 3` (papermill only warns) fails in the validation cell, and results/ is untouched."""
    import papermill

    before = _snapshot(results_copy)
    with pytest.raises(papermill.PapermillExecutionError, match="unknown parameter EPOCH"):
        _run_smoke(paper_id, tmp_path / "out.ipynb", RESULTS_DIR=str(results_copy), RUN_TAG="cpu", EPOCH=3)
    assert _snapshot(results_copy) == before


@pytest.mark.parametrize("overrides, message", [
    ({"RUN_TAG": "../timofeev2022/cpu"}, "RUN_TAG"),
    ({"SEEDS": "[0, 1"}, "SEEDS"),
])
def test_bad_run_tags_and_lists_are_refused(overrides, message, results_copy, tmp_path):
    import papermill

    before = _snapshot(results_copy)
    with pytest.raises(papermill.PapermillExecutionError, match=message):
        _run_smoke("drcl2024", tmp_path / "out.ipynb", **{"RESULTS_DIR": str(results_copy), **overrides})
    assert _snapshot(results_copy) == before


def test_a_run_that_fails_midway_leaves_results_untouched(results_copy, tmp_path):
    """A run that passes validation and starts, then fails (here: its data root is empty), publishes nothing."""
    import papermill

    before = _snapshot(results_copy)
    (tmp_path / "empty-data").mkdir()
    with pytest.raises(papermill.PapermillExecutionError):
        _run_smoke("timofeev2022", tmp_path / "out.ipynb", RESULTS_DIR=str(results_copy), RUN_TAG="cpu",
                   DATA_ROOT=str(tmp_path / "empty-data"))
    assert _snapshot(results_copy) == before
