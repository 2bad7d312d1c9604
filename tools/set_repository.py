"""Point the book at its GitHub repository: ``python tools/set_repository.py OWNER/NAME`` (``make repository``).

The repository's address is written where nothing can look it up at run time: ``_config.yml`` (the repository,
issue and launch buttons), each notebook's Colab cell (Colab opens a notebook without its repository, so the cell
clones it), the paper template, README.md and CONTRIBUTING.md. This replaces the current address, read from
``_config.yml``'s ``repository.url``, by ``https://github.com/OWNER/NAME`` in every one of those files, and
reports the files it changed. ``--check`` changes nothing and fails if the placeholder is still there.

The Pages workflow runs it with the repository it publishes from, so the site's buttons are right even before
the address is committed; commit it once, so that Colab (which reads the notebooks from GitHub) clones the
right repository too.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "https://github.com/OWNER/xmr"
NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
FILES = ("_config.yml", "README.md", "CONTRIBUTING.md", "xmr/templates/paper.ipynb", "notebooks/*.ipynb")


def current_address(root: Path = ROOT) -> str:
    """``repository.url`` of ``_config.yml`` (read without PyYAML: the Pages workflow runs this before installing)."""
    config = (root / "_config.yml").read_text()
    found = re.search(r"^repository:[ \t]*\n(?:[ \t]+.*\n)*?[ \t]+url:[ \t]*(\S+)", config, re.M)
    if not found:
        raise ValueError(f"{root / '_config.yml'} has no repository: url: entry")
    return found.group(1).rstrip("/")


def files_naming(address: str, root: Path = ROOT) -> list[Path]:
    return sorted({path for pattern in FILES for path in root.glob(pattern) if address in path.read_text()})


def set_repository(name: str, root: Path = ROOT) -> list[Path]:
    """Replace the current address by ``https://github.com/<name>`` in every file of ``FILES``; the changed files."""
    if not NAME.match(name):
        raise ValueError(f"expected OWNER/NAME as GitHub spells it (e.g. octocat/xmr), got {name!r}")
    old, new = current_address(root), f"https://github.com/{name}"
    if old == new:
        return []
    changed = files_naming(old, root)
    for path in changed:
        path.write_text(path.read_text().replace(old, new))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="OWNER/NAME of the repository on GitHub")
    parser.add_argument("--check", action="store_true", help="fail if the placeholder address is still in use")
    args = parser.parse_args(argv)
    if args.check:
        left = files_naming(PLACEHOLDER)
        for path in left:
            print(f"{path.relative_to(ROOT)}: still names the placeholder {PLACEHOLDER}", file=sys.stderr)
        return 1 if left else 0
    if not args.name:
        parser.error("give OWNER/NAME, or --check")
    try:
        changed = set_repository(args.name)
    except ValueError as error:
        parser.error(str(error))
    for path in changed:
        print(f"{path.relative_to(ROOT)}: now names https://github.com/{args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
