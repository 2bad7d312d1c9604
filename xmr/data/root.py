"""Where the datasets live: the data root, dataset layouts and the errors a loader raises."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV_VAR = "XMR_DATA"
# What to do about a file that exists but cannot be read as its documented format.
DAMAGED_ADVICE = ("check the file; if it was cut short or changed, download it again from the official source "
                  "below")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset, or a file it needs, is not where the loader looked."""


class DatasetFormatError(ValueError):
    """A dataset's files exist but disagree with its documented format (row counts, missing captions)."""


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded."""


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the ``root`` argument, else ``$XMR_DATA``, else ``../shared/data`` beside the repository
    where it exists, else the user cache folder that ``python -m xmr.data fetch`` fills; it must exist."""
    if root is not None:
        path, origin = Path(root), "the root argument"
    else:
        from .fetch import default_data_root_with_origin  # lazy: fetch imports this module
        path, origin = default_data_root_with_origin()
    path = path.expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"Data root {path} (from {origin}) is not a directory: pass root=... to the loader, set {DATA_ENV_VAR} "
            f"to the folder that holds the dataset folders, or download them there with "
            f"`python -m xmr.data fetch` (then `python -m xmr.data check`)."
        )
    return path


def repeated(items) -> list:
    """The items that occur more than once, each once, in order of first occurrence."""
    seen, twice = set(), {}
    for item in items:
        if item in seen:
            twice[item] = None
        seen.add(item)
    return list(twice)


def first_few(items, count: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, ... (12 in all)``: examples for an error message."""
    items = list(items)
    shown = ", ".join(str(item) for item in items[:count])
    return shown if len(items) <= count else f"{shown}, ... ({len(items)} in all)"


@dataclass(frozen=True)
class DatasetLayout:
    """How one dataset is laid out under the data root, and where to get it."""

    name: str                # human name, e.g. "Flickr8k"
    folder: str              # folder under the data root, e.g. "flickr8k"
    files: tuple[str, ...]   # expected entries of that folder (one line each in error messages)
    source: str              # citation and official download address

    def describe(self, problem: str, searched: str | os.PathLike | None) -> str:
        """An error message: the problem, the root searched, the expected layout and the official source."""
        layout = "\n".join(f"    {self.folder}/{entry}" for entry in self.files)
        return (
            f"{self.name}: {problem}\n"
            f"  Searched: {searched if searched is not None else '(none given)'}\n"
            f"  Expected layout under the data root (root may also point at {self.folder}/ itself):\n{layout}\n"
            f"  Official source: {self.source}\n"
            f"  Pass root=... or set {DATA_ENV_VAR} to the folder that holds {self.folder}/."
        )

    def not_found(self, problem: str, searched: str | os.PathLike | None) -> DatasetNotFoundError:
        return DatasetNotFoundError(self.describe(problem, searched))

    def malformed(self, problem: str, searched: str | os.PathLike | None) -> DatasetFormatError:
        return DatasetFormatError(self.describe(problem, searched))

    def read_lines(self, path: Path, searched: str | os.PathLike | None) -> list[str]:
        """The lines of a UTF-8 text file of this dataset.

        Raises :class:`DatasetFormatError` naming the file (and the line) if it is not UTF-8 or holds no text.
        """
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data.count(b"\n", 0, error.start) + 1
            raise self.malformed(f"{path}:{line}: not valid UTF-8 (byte {data[error.start]:#04x} at offset "
                                 f"{error.start}); {DAMAGED_ADVICE}", searched) from error
        lines = text.removeprefix("\ufeff").splitlines()
        if not any(line.strip() for line in lines):
            raise self.malformed(f"{path} is empty; {DAMAGED_ADVICE}", searched)
        return lines

    def locate(self, root: str | os.PathLike | None = None, required: tuple[str, ...] = ()) -> Path:
        """The dataset folder (``<root>/<folder>``, or ``root`` itself), checked to hold ``required`` files."""
        try:
            data_root = resolve_data_root(root)
        except DatasetNotFoundError as error:
            raise self.not_found(str(error), root if root is not None else os.environ.get(DATA_ENV_VAR)) from None
        nested = data_root / self.folder
        if nested.is_dir():
            directory = nested
        elif any((data_root / name).exists() for name in required):
            directory = data_root  # root points at the dataset folder itself
        else:
            raise self.not_found(f"no {self.folder}/ folder in {data_root}", data_root)
        missing = [name for name in required if not (directory / name).exists()]
        if missing:
            raise self.not_found(f"missing {', '.join(missing)} in {directory}", data_root)
        return directory
