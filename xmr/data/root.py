"""Where the datasets live: the data root, dataset layouts and the errors a loader raises."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV_VAR = "XMR_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset, or a file it needs, is not where the loader looked."""


class DatasetFormatError(ValueError):
    """A dataset's files exist but disagree with its documented format (row counts, missing captions)."""


class CorruptImageError(OSError):
    """An image file exists but cannot be decoded."""


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the ``root`` argument, else ``$XMR_DATA``; it must be an existing directory."""
    if root is not None:
        path, origin = Path(root), "the root argument"
    elif os.environ.get(DATA_ENV_VAR):
        path, origin = Path(os.environ[DATA_ENV_VAR]), f"${DATA_ENV_VAR}"
    else:
        raise DatasetNotFoundError(
            f"No data root given: pass root=... to the loader or set the environment variable {DATA_ENV_VAR} "
            f"(e.g. export {DATA_ENV_VAR}=/path/to/data) to the folder that holds the dataset folders."
        )
    path = path.expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"Data root {path} (from {origin}) is not a directory: pass root=... to the loader "
            f"or set {DATA_ENV_VAR} to the folder that holds the dataset folders."
        )
    return path


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
