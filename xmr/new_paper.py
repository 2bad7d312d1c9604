"""Start a reproduction: ``python -m xmr.new_paper ID [--title TITLE]`` (or ``make new-paper ID=...``).

Writes, from the templates in ``xmr/templates/``, a notebook that already runs end to end (parameters, their
validation, Flickr8k inputs, two dual encoders over the seeds, a metrics table, one judged claim and one
untestable one, a glued summary, the publish step), with every place to fill in marked TODO:

- ``notebooks/ID.ipynb``
- ``notebooks/params/ID_smoke.yaml`` (the tests' run) and ``notebooks/params/ID_gpu.yaml``
- ``xmr/paper_numbers/ID.json`` (the paper's reported numbers, with table references)
- ``results/ID/.gitkeep``
- an entry under "The papers" in ``_toc.yml``

``ID`` is a plain lower-case identifier (``smith2025``: the first author and the year), the name of the paper
everywhere. Nothing is written if any of these exists already or the id is taken. See CONTRIBUTING.md for what
comes next (the smoke reference, tests, the verdict).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from .results import COMPARISON_ID, PAPER_IDS, REPOSITORY

TEMPLATES = Path(__file__).with_name("templates")
PAPER_ID = re.compile(r"^[a-z][a-z0-9_]{2,39}$")
PLACEHOLDER_ID, PLACEHOLDER_TITLE = "__PAPER_ID__", "__TITLE__"
TOC_PART = "The papers"  # the _toc.yml part whose chapters list the paper notebooks


class NewPaperError(ValueError):
    """The id is invalid or taken, or the repository lacks what the generator edits."""


def check_paper_id(paper_id: str) -> str:
    if not isinstance(paper_id, str) or not PAPER_ID.match(paper_id):
        raise NewPaperError(f"a paper id is a plain lower-case identifier: a letter, then 2-39 lower-case letters, "
                            f"digits or '_' (e.g. smith2025), got {paper_id!r}")
    if paper_id in (*PAPER_IDS, COMPARISON_ID):
        raise NewPaperError(f"{paper_id!r} is taken")
    return paper_id


def targets(paper_id: str, root: Path) -> dict[str, Path]:
    return {"notebook": root / "notebooks" / f"{paper_id}.ipynb",
            "smoke": root / "notebooks" / "params" / f"{paper_id}_smoke.yaml",
            "gpu": root / "notebooks" / "params" / f"{paper_id}_gpu.yaml",
            "paper_numbers": root / "xmr" / "paper_numbers" / f"{paper_id}.json",
            "results": root / "results" / paper_id / ".gitkeep"}


def fill(text: str, paper_id: str, title: str) -> str:
    return text.replace(PLACEHOLDER_ID, paper_id).replace(PLACEHOLDER_TITLE, title)


def notebook_text(paper_id: str, title: str) -> str:
    notebook = json.loads((TEMPLATES / "paper.ipynb").read_text())
    for cell in notebook["cells"]:
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        cell["source"] = fill(source, paper_id, title)
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def toc_with_entry(toc: str, paper_id: str) -> str:
    """``toc`` with ``- file: notebooks/<paper_id>`` after the last chapter of the part captioned TOC_PART (the
    file's comments and layout kept)."""
    lines = toc.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(rf"\s*- caption:\s*{TOC_PART}\s*$", line)), None)
    if start is None:
        raise NewPaperError(f"_toc.yml has no part captioned {TOC_PART!r}")
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s*- caption:", lines[i])), len(lines))
    chapters = [i for i in range(start + 1, end) if re.match(r"\s*- file:", lines[i])]
    if not chapters:
        raise NewPaperError(f"the part {TOC_PART!r} of _toc.yml lists no chapter to add after")
    last = lines[chapters[-1]]
    indent = last[: len(last) - len(last.lstrip())]
    newline = "" if last.endswith("\n") else "\n"
    lines[chapters[-1]] = last + newline
    lines.insert(chapters[-1] + 1, f"{indent}- file: notebooks/{paper_id}\n")
    return "".join(lines)


def create(paper_id: str, title: str | None = None, root: str | Path = REPOSITORY) -> list[Path]:
    """Write a new reproduction's files into the repository at ``root``; return the paths written."""
    paper_id, root = check_paper_id(paper_id), Path(root)
    title = title or "TODO: the paper's title"
    paths = targets(paper_id, root)
    toc_path = root / "_toc.yml"
    if not toc_path.is_file():
        raise NewPaperError(f"{toc_path} not found: run this in the repository (or pass --root)")
    toc = toc_path.read_text()
    taken = [str(path.relative_to(root)) for path in (*paths.values(), paths["results"].parent) if path.exists()]
    if re.search(rf"^\s*- file:\s*notebooks/{re.escape(paper_id)}(\.ipynb)?\s*$", toc, flags=re.MULTILINE):
        taken.append("its _toc.yml entry")
    if taken:
        raise NewPaperError(f"{paper_id!r} exists already: {', '.join(taken)}")
    new_toc = toc_with_entry(toc, paper_id)
    contents = {
        paths["notebook"]: notebook_text(paper_id, title),
        paths["smoke"]: fill((TEMPLATES / "paper_smoke.yaml").read_text(), paper_id, title),
        paths["gpu"]: fill((TEMPLATES / "paper_gpu.yaml").read_text(), paper_id, title),
        paths["paper_numbers"]: fill((TEMPLATES / "paper_numbers.json").read_text(), paper_id, title),
        paths["results"]: "",
    }
    for path, text in contents.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    toc_path.write_text(new_toc)
    return [*contents, toc_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmr.new_paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("paper_id", metavar="ID", help="plain lower-case identifier, e.g. smith2025")
    parser.add_argument("--title", help="the paper's title, for the notebook's heading")
    parser.add_argument("--root", default=str(REPOSITORY), help="the repository to write into (default: this one)")
    args = parser.parse_args(argv)
    try:
        written = create(args.paper_id, args.title, args.root)
    except NewPaperError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    root = Path(args.root)
    print("\n".join(f"wrote {path.relative_to(root)}" for path in written))
    print(f"next: fill in the TODOs (grep -n TODO {written[0].relative_to(root)}), then "
          f"`.venv/bin/python tools/smoke_notebooks.py {args.paper_id}`; see CONTRIBUTING.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
