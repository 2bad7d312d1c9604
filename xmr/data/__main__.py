"""``python -m xmr.data``: fetch the datasets from their official sources, or check a data root.

    python -m xmr.data list                      # the datasets, their sources and checksums
    python -m xmr.data fetch [NAME...] [--root DIR]
    python -m xmr.data check [NAME...] [--root DIR]

The data root defaults to $XMR_DATA, else ../shared/data beside the repository, else the user cache folder
(``<user cache>/xmr/data``) that ``fetch`` writes to. ``check`` exits with 1 when a dataset is missing or wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .fetch import (
    MIRROR_ENV_VAR,
    FetchError,
    check,
    default_data_root_with_origin,
    download_cache,
    fetch,
    format_report,
)
from .registry import REGISTRY


def data_root(argument: str | None) -> tuple[Path, str]:
    if argument is not None:
        return Path(argument).expanduser(), "--root"
    return default_data_root_with_origin()


def list_sources() -> None:
    for dataset in REGISTRY.values():
        print(f"{dataset.name}  ->  <root>/{dataset.folder}/  (read by {dataset.loader})")
        print(f"  {dataset.title}")
        print(f"  cite: {dataset.citation}; see {dataset.homepage}")
        if dataset.note:
            print(f"  note: {dataset.note}")
        for resource in dataset.resources:
            print(f"  - {resource.url}" + (f"  ({resource.size})" if resource.size else ""))
            print(f"    sha256: {resource.sha256 or resource.sha256_note}")
            if resource.note:
                print(f"    {resource.note}")
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmr.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    names = f"dataset names (default: all): {', '.join(REGISTRY)}"

    fetch_parser = commands.add_parser("fetch", help="download and unpack datasets into the data root")
    fetch_parser.add_argument("names", nargs="*", metavar="NAME", help=names)
    fetch_parser.add_argument("--root", help="data root to fill (default: see above)")
    fetch_parser.add_argument("--downloads", help=f"download cache (default: {download_cache()})")
    fetch_parser.add_argument("--mirror", help=f"fetch every file from MIRROR/<file name> (or ${MIRROR_ENV_VAR})")
    fetch_parser.add_argument("--force", action="store_true", help="fetch even datasets that check as complete")
    fetch_parser.add_argument("--no-verify", action="store_true",
                              help="install unpacked files even where they differ from the registry")
    fetch_parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    check_parser = commands.add_parser("check", help="report, per dataset, OK or what is missing or wrong")
    check_parser.add_argument("names", nargs="*", metavar="NAME", help=names)
    check_parser.add_argument("--root", help="data root to check (default: see above)")

    commands.add_parser("list", help="the datasets, their official sources and checksums")

    args = parser.parse_args(argv)
    if args.command == "list":
        list_sources()
        return 0
    root, origin = data_root(args.root)
    try:
        if args.command == "fetch":
            print(f"data root: {root}  ({origin})")
            results = fetch(args.names, root, args.downloads, mirror=args.mirror, force=args.force,
                            verify=not args.no_verify, progressbar=not args.no_progress)
        else:
            print(f"data root: {root}  ({origin})")
            results = check(args.names, root)
            print(format_report(results, root if args.root is not None else None))
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
