"""Every parameter file under notebooks/params names only parameters its notebook has, with values of their types."""

import ast
import json
from pathlib import Path

import pytest
import yaml

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TYPES = {"int": int, "float": (int, float), "str": str, "list": list, "bool": bool, "dict": dict}


def notebook_parameters(notebook: Path) -> dict[str, str]:
    """``{name: annotation}`` of the cell tagged ``parameters``."""
    cells = json.loads(notebook.read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c["metadata"].get("tags", []))
    return {node.target.id: ast.unparse(node.annotation) for node in ast.parse(source).body
            if isinstance(node, ast.AnnAssign)}


@pytest.mark.parametrize("path", sorted((NOTEBOOKS / "params").glob("*.yaml")), ids=lambda p: p.stem)
def test_parameter_file_matches_its_notebook(path):
    notebook = NOTEBOOKS / f"{path.stem.rsplit('_', 1)[0]}.ipynb"
    assert notebook.exists(), f"{path.name} names no notebook"
    declared = notebook_parameters(notebook)
    for name, value in (yaml.safe_load(path.read_text()) or {}).items():
        assert name in declared, f"{path.name}: {name} is not a parameter of {notebook.name}"
        expected = TYPES[declared[name]]
        assert isinstance(value, expected) and not (isinstance(value, bool) and declared[name] != "bool"), \
            f"{path.name}: {name} = {value!r} is not a {declared[name]}"
