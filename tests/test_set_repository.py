"""The repository's address: one command sets it everywhere, and every Colab cell matches the template's."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import set_repository  # noqa: E402

COLAB_CELL = "# Colab and Binder only"
# the part of the cell that differs between notebooks: the datasets it fetches (none on the performance page)
FETCH = re.compile(r'\nif in_colab or on_binder:[^\n]*\n    subprocess\.run\(\[sys\.executable, "-m", "xmr\.data", '
                   r'"fetch", "--no-progress",[^\]]*\], check=True\)\n?')


def colab_cells() -> dict[str, str]:
    """Each notebook's (and the template's) Colab cell, by path."""
    cells = {}
    for path in [ROOT / "xmr/templates/paper.ipynb", *sorted((ROOT / "notebooks").glob("*.ipynb"))]:
        notebook = json.loads(path.read_text())
        first = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
        if "".join(first["source"]).startswith(COLAB_CELL):
            cells[str(path.relative_to(ROOT))] = "".join(first["source"])
    return cells


@pytest.fixture
def copy(tmp_path):
    for pattern in set_repository.FILES:
        for path in ROOT.glob(pattern):
            (tmp_path / path.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, tmp_path / path.relative_to(ROOT))
    return tmp_path


def test_setting_the_repository_replaces_the_address_everywhere(copy):
    old = set_repository.current_address(copy)
    holders = set_repository.files_naming(old, copy)
    assert copy / "_config.yml" in holders and copy / "xmr/templates/paper.ipynb" in holders

    changed = set_repository.set_repository("octocat/xmr-book", copy)

    assert changed == holders
    assert set_repository.current_address(copy) == "https://github.com/octocat/xmr-book"
    assert not set_repository.files_naming(old, copy)
    for path in changed:
        if path.suffix == ".ipynb":
            json.loads(path.read_text())  # still a notebook
    assert set_repository.set_repository("octocat/xmr-book", copy) == []  # idempotent


@pytest.mark.parametrize("name", ["octocat", "octocat/", "/xmr", "octo cat/xmr", "https://github.com/octocat/xmr"])
def test_a_malformed_repository_name_changes_nothing(copy, name):
    before = {path: path.read_bytes() for path in copy.rglob("*") if path.is_file()}
    with pytest.raises(ValueError, match="OWNER/NAME"):
        set_repository.set_repository(name, copy)
    assert before == {path: path.read_bytes() for path in copy.rglob("*") if path.is_file()}


def test_every_colab_cell_is_the_templates_with_its_own_datasets_and_the_books_address():
    cells = colab_cells()
    template = cells.pop("xmr/templates/paper.ipynb")
    assert set_repository.current_address() in template
    assert cells, "no notebook has the Colab cell"
    for path, source in cells.items():  # the first line says what the cell fetches
        assert FETCH.sub("", source.split("\n", 1)[1]) == FETCH.sub("", template.split("\n", 1)[1]), path
