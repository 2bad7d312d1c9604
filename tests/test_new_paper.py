"""``python -m xmr.new_paper``: the generated reproduction runs end to end and publishes valid result files.

The generator writes into a temporary copy of the files it needs (the ``xmr`` package, ``_toc.yml``), never into
this repository. The generated notebook is then run in smoke mode by papermill, with its own smoke parameters, a
``RESULTS_DIR`` and staging folder in the temporary folder and the copied package first on the kernel's path (so
``paper_numbers`` finds the generated numbers file); its smoke reference, made the way
``tools/smoke_notebooks.py`` makes one, must then pass nbval as the paper notebooks' references do.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

from xmr import new_paper
from xmr.results import read_record

REPO = Path(__file__).resolve().parents[1]
PAPER = "newpaper2099"
CHECKED = "nbval-check-output"


def minimal_repository(root: Path) -> Path:
    shutil.copytree(REPO / "xmr", root / "xmr", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "_toc.yml", root / "_toc.yml")
    (root / "notebooks" / "params").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    root = minimal_repository(tmp_path_factory.mktemp("repository"))
    new_paper.create(PAPER, "A paper made up for the tests", root)
    return root


def test_the_generator_writes_every_file_of_a_reproduction(generated):
    notebook_path = generated / "notebooks" / f"{PAPER}.ipynb"
    for path in (notebook_path, generated / "notebooks" / "params" / f"{PAPER}_smoke.yaml",
                 generated / "notebooks" / "params" / f"{PAPER}_gpu.yaml",
                 generated / "xmr" / "paper_numbers" / f"{PAPER}.json", generated / "results" / PAPER / ".gitkeep"):
        assert path.is_file(), f"{path.relative_to(generated)} was not written"
    assert not (REPO / "notebooks" / f"{PAPER}.ipynb").exists(), "the test wrote into the repository"

    chapters = [chapter["file"] for part in yaml.safe_load((generated / "_toc.yml").read_text())["parts"]
                if part["caption"] == "The papers" for chapter in part["chapters"]]
    assert chapters[-1] == f"notebooks/{PAPER}" and chapters.count(f"notebooks/{PAPER}") == 1

    notebook = nbformat.read(notebook_path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].source.startswith("# A paper made up for the tests (newpaper2099)")
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    tagged = [index for index, cell in enumerate(code) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    validation = code[tagged[0] + 1].source
    assert "check_parameters(globals()" in validation and "start_run(PAPER_ID, RUN_TAG, RESULTS_DIR)" in validation
    assert code[-1].source.startswith("published = run.publish()")
    assert "__PAPER_ID__" not in notebook_path.read_text()
    assert any(f'PAPER_ID = "{PAPER}"' in cell.source for cell in code[:tagged[0]])

    smoke = yaml.safe_load((generated / "notebooks" / "params" / f"{PAPER}_smoke.yaml").read_text())
    assert smoke["RUN_TAG"] == "smoke" and len(smoke["SEEDS"]) == 2 and smoke["EPOCHS"] == 1
    assert 16 <= smoke["TRAIN_IMAGES"] <= 100


@pytest.mark.parametrize("paper_id", ["Smith2025", "smith-2025", "2025smith", "x", "smith 2025", "../smith2025",
                                      "timofeev2022", "comparison"])
def test_invalid_or_taken_ids_are_refused_before_anything_is_written(paper_id, tmp_path):
    shutil.copy(REPO / "_toc.yml", tmp_path / "_toc.yml")
    with pytest.raises(new_paper.NewPaperError):
        new_paper.create(paper_id, root=tmp_path)
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["_toc.yml"]
    assert (tmp_path / "_toc.yml").read_text() == (REPO / "_toc.yml").read_text()


def test_an_existing_reproduction_is_not_overwritten(tmp_path):
    shutil.copy(REPO / "_toc.yml", tmp_path / "_toc.yml")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "explorer.ipynb").write_text("{}")  # a notebook that is not a paper
    with pytest.raises(new_paper.NewPaperError, match="exists already"):
        new_paper.create("explorer", root=tmp_path)
    new_paper.create("smith2025", root=tmp_path)
    toc = (tmp_path / "_toc.yml").read_text()
    with pytest.raises(new_paper.NewPaperError, match="exists already"):
        new_paper.create("smith2025", root=tmp_path)
    assert (tmp_path / "_toc.yml").read_text() == toc


def test_the_command_line_reports_a_refusal(tmp_path):
    shutil.copy(REPO / "_toc.yml", tmp_path / "_toc.yml")
    result = subprocess.run([sys.executable, "-m", "xmr.new_paper", "Not-An-Id", "--root", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "plain lower-case identifier" in result.stderr


@pytest.fixture(scope="module")
def kernel_environment(generated, data_root, tmp_path_factory):
    """The kernels import the copied package (with the generated numbers file) and stage runs in tmp."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(generated), os.environ.get("PYTHONPATH")])))
        patch.setenv("XMR_RUNS", str(tmp_path_factory.mktemp("runs")))
        patch.setenv("XMR_DATA", str(data_root))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        yield dict(os.environ)


@pytest.fixture(scope="module")
def smoke_run(generated, kernel_environment, tmp_path_factory):
    """(executed notebook, results folder) of the generated notebook run with its smoke parameters."""
    import papermill

    results = tmp_path_factory.mktemp("results")
    parameters = yaml.safe_load((generated / "notebooks" / "params" / f"{PAPER}_smoke.yaml").read_text())
    executed = papermill.execute_notebook(
        str(generated / "notebooks" / f"{PAPER}.ipynb"), str(generated / "notebooks" / f"{PAPER}_smoke.ipynb"),
        parameters={**parameters, "RESULTS_DIR": str(results)}, cwd=str(generated / "notebooks"),
        kernel_name="python3", progress_bar=False, execution_timeout=600)
    return executed, results


def test_the_smoke_run_publishes_valid_claims_and_runs(smoke_run):
    executed, results = smoke_run
    published = sorted(path.name for path in (results / PAPER).glob("*.json"))
    runs = [f"smoke_{arm}_seed{seed}.json" for arm in ("baseline", "method") for seed in (0, 1)]
    assert published == sorted([*runs, "smoke_claims.json"])
    claims = read_record(results / PAPER / "smoke_claims.json")  # validated against the schema
    assert claims["kind"] == "claims" and claims["paper_id"] == PAPER and claims["parameters"]["SEEDS"] == [0, 1]
    rows = {row["claim_id"]: row for row in claims["claims"]}
    assert set(rows) == {"method-over-baseline", "absolute-recalls"}
    assert rows["method-over-baseline"]["n_seeds"] == [2, 2] and rows["method-over-baseline"]["gap"] is not None
    assert rows["absolute-recalls"]["verdict"] == "not testable here"
    for name in runs:
        record = read_record(results / PAPER / name)
        assert record["kind"] == "run" and record["training"]["epochs_budget"] == 1
    errors = [output for cell in executed.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors


def test_the_smoke_reference_passes_nbval(smoke_run, kernel_environment, tmp_path):
    """The reference `tools/smoke_notebooks.py` would write: only the checked cells' outputs kept; nbval re-runs
    it and compares those (dataset sizes, the published files), after the suite's sanitisers."""
    executed, _ = smoke_run
    reference = nbformat.from_dict(executed)
    for cell in reference.cells:
        if cell.cell_type == "code" and CHECKED not in cell.metadata.get("tags", []):
            cell.outputs, cell.execution_count = [], None
    checked = [cell for cell in reference.cells if CHECKED in cell.metadata.get("tags", [])]
    assert checked and all(cell.outputs for cell in checked)
    path = tmp_path / f"{PAPER}.ipynb"
    nbformat.write(reference, path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(path),
         "--nbval-lax", "--nbval-current-env", "--nbval-sanitize-with", str(REPO / "tests" / "nbval_sanitize.cfg"),
         "--nbval-cell-timeout", "600"],
        cwd=tmp_path, env=kernel_environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
