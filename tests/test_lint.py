"""The project's habits: the GitHub workflows pass actionlint, the Pages workflow builds and deploys the book with
GitHub's own actions, and the lint tools and environment files agree with pyproject.toml."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned(requirement_name: str) -> str:
    """The ``name==version`` pin of a dev-extra requirement."""
    pins = [req for req in PYPROJECT["project"]["optional-dependencies"]["dev"] if req.startswith(requirement_name)]
    assert len(pins) == 1 and "==" in pins[0], f"the dev extra should pin {requirement_name} exactly: {pins}"
    return pins[0]


@pytest.fixture(scope="module")
def actionlint() -> str:
    found = shutil.which("actionlint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                             os.environ.get("PATH", "")]))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must lint the workflows: actionlint is missing (pip install -e '.[dev]')")
        pytest.skip("actionlint not installed (it is in the dev extra)")
    return found


def test_there_is_a_workflow():
    assert WORKFLOWS, "no .github/workflows/*.yml"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_passes_actionlint(workflow, actionlint):
    result = subprocess.run([actionlint, "-no-color", str(workflow.relative_to(REPO))], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(actionlint, tmp_path):
    """The check has teeth: an unknown runner label, a missing `steps` key and a bad expression are reported."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\njobs:\n  build:\n    runs-on: ubuntu-latets\n"
                      "    steps:\n      - run: echo ${{ github.sha }\n")
    result = subprocess.run([actionlint, "-no-color", str(broken)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "broken.yml" in result.stdout, result.stdout + result.stderr


def test_pages_workflow_builds_the_executed_book_and_deploys_it():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "pages.yml").read_text())
    jobs = workflow["jobs"]
    steps = [step for job in jobs.values() for step in job.get("steps", [])]
    uses = [step["uses"].split("@")[0] for step in steps if "uses" in step]
    for action in ("actions/configure-pages", "actions/upload-pages-artifact", "actions/deploy-pages"):
        assert action in uses, f"pages.yml does not use {action}"
    runs = [step["run"] for step in steps if "run" in step]
    assert any(re.search(r"\bmake html\b", run) for run in runs), "the site is built with `make html`"
    assert not any(re.search(r"\bmake (book|notebooks)\b|papermill", run) for run in runs), (
        "the published site renders the committed, already executed notebooks: it must not execute them")
    upload = next(step for step in steps if step.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    assert workflow["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert jobs["deploy"]["environment"]["name"] == "github-pages" and jobs["deploy"]["needs"] == "build"


def test_pre_commit_hooks_use_the_pinned_tools():
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert hooks["ruff"]["additional_dependencies"] == [pinned("ruff")]
    assert hooks["actionlint"]["additional_dependencies"] == [pinned("actionlint")]


def test_ruff_checks_the_notebooks_with_the_house_rules():
    ruff = PYPROJECT["tool"]["ruff"]
    assert ruff["line-length"] == 120 and "*.ipynb" in ruff["extend-include"]
    assert {"E", "F", "W", "I"} <= set(ruff["lint"]["select"])


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_what_make_env_installs():
    """Conda users and Binder get the same packages as `make env` (the dependencies and the dev, book and lab
    extras), with the same pins."""
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(item["pip"] for item in environment["dependencies"] if isinstance(item, dict))
    listed = {requirement_name(req): req.replace(" ", "") for req in pip_section if not req.startswith("-")}
    extras = PYPROJECT["project"]["optional-dependencies"]
    wanted = PYPROJECT["project"]["dependencies"] + extras["dev"] + extras["book"] + extras["lab"]
    missing = sorted({requirement_name(req) for req in wanted} - set(listed))
    assert not missing, f"environment.yml lacks {missing}"
    for req in wanted:
        if "==" in req:
            assert listed[requirement_name(req)] == req.replace(" ", ""), f"environment.yml pins {req} differently"
    assert "-e ." in pip_section, "environment.yml installs xmr itself (Binder imports it)"
