"""The book's notebook runner retries a notebook whose cell hangs, and only a hang."""

import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from run_notebook import execute, retry_settings  # noqa: E402


def notebook(path: Path, source: str, retry: dict | None) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if retry:
        nb.metadata["xmr"] = {"retry": retry}
    nbformat.write(nb, path)
    return path


HANG_ONCE = """import pathlib, time
marker = pathlib.Path("hung-once")
if not marker.exists():
    marker.touch()
    time.sleep(60)  # the first attempt hangs past the cell timeout
print("done")"""


def test_a_hanging_cell_is_retried_and_the_second_attempt_completes(tmp_path):
    path = notebook(tmp_path / "hang.ipynb", HANG_ONCE, {"cell_timeout": 5, "attempts": 2})
    executed = execute(path, path, tmp_path, kernel_name="python3", progress_bar=False)
    assert (tmp_path / "hung-once").exists()
    assert executed.cells[0].outputs[0]["text"] == "done\n"


def test_without_retry_metadata_a_notebook_runs_once_with_the_long_timeout(tmp_path):
    path = notebook(tmp_path / "plain.ipynb", "print(1)", None)
    assert retry_settings(path) == (3600, 1)


def test_a_cell_error_is_not_retried(tmp_path):
    import papermill

    counter = tmp_path / "runs"
    source = (f"import pathlib\np = pathlib.Path({str(counter)!r})\n"
              "p.write_text(p.read_text() + 'x' if p.exists() else 'x')\n1 / 0")
    path = notebook(tmp_path / "error.ipynb", source, {"cell_timeout": 30, "attempts": 3})
    with pytest.raises(papermill.PapermillExecutionError, match="ZeroDivisionError"):
        execute(path, path, tmp_path, kernel_name="python3", progress_bar=False)
    assert counter.read_text() == "x"
