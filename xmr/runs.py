"""Validated notebook parameters, and runs that replace only their own result files, all at once, at the end.

**Parameters.** The cell after a notebook's ``parameters`` cell calls :func:`check_parameters` with one spec per
parameter (:class:`Integer`, :class:`Number`, :class:`Flag`, :class:`Text`, :class:`Choices`, :class:`Folder`,
:class:`RunTag`; ``many=True`` for lists). Every problem is collected and raised together as one
:class:`ParameterError` before any work is done or any file is written: wrong types (``True`` is not an integer),
out-of-range values, misspelt names in a list of choices, and UPPER_CASE globals that are not in the spec (a
misspelt ``papermill -p EPOCH 3`` arrives as a global ``EPOCH``, which papermill only warns about).
``papermill -p SEEDS "[0, 1]"`` arrives as a string: it is parsed as JSON and written back into the globals.

**Runs.** :func:`start_run` makes a fresh, empty staging folder outside the repository
(``$XMR_RUNS/<paper_id>/<run_tag>-<timestamp>-<pid>``, default ``$XMR_RUNS`` = ``~/.cache/xmr/runs``); the notebook
writes every result file there (``write_result(run.staging_dir, paper_id, f"{run_tag}_...")``) and calls
:meth:`Run.publish` as its last step. A run that fails or is interrupted before that changes nothing in
``results/``. Publishing replaces, in ``<results_dir>/<paper_id>/``, exactly the files of the run's tag
(``<run_tag>_*.json``); other tags and other papers are not touched. Run tags have no ``_``: the underscore
separates the tag from the run name, and a tag ``cpu`` must not own the files of a tag ``cpu_fast``.
Smoke runs (tag ``smoke*`` or ``test*``) may not publish into the repository's own ``results/`` folder, and only
the book's own run (``make notebooks``, which sets ``XMR_BOOK_RUN=1``) publishes there: any other run aimed at it
publishes into ``$XMR_RESULTS`` (default ``~/.cache/xmr/results``) instead, and says so.

**Publish ordering (no journal).** Under an exclusive ``flock`` on the paper's result folder:
(1) every staged file is checked (name, JSON ``paper_id`` / ``run_name``); (2) each is copied next to its
target as a hidden ``*.publish.tmp`` file and fsynced; (3) a marker ``.<run_tag>.publishing`` listing the new
names is written; (4) each temporary file is renamed onto its final name (``os.replace``, atomic per file);
(5) only then are the tag's old files that the new run did not produce removed; (6) the marker is removed.
A crash before (4) leaves the old files untouched (hidden temporaries are removed by the tag's next publish);
a crash in (4) leaves every old file, some already replaced by their new version, and some new files; a crash in
(5) leaves the complete new set and some of the old files it drops. So at worst the tag holds both old and new
files, never a missing one: the old set stays complete until the new set is. The marker tells that a mixture
may exist (:func:`start_run` warns); publishing the tag again repairs it. A roll-forward journal was not needed:
a rerun replaces the whole tag anyway, and the marker is enough to notice.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
import types
import warnings
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from xmr.results import COMPARISON_ID, PAPER_IDS, REPOSITORY

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: publishes into one folder are not serialised
    fcntl = None

PARAMETER_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
RUN_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")  # no "_": it separates the tag from the run name
PLAIN_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
SCRATCH_TAG_PREFIXES = ("smoke", "test")  # such runs never publish into the repository's results/
BOOK_RUN_ENV = "XMR_BOOK_RUN"  # "1" under `make notebooks`: only the book's own run publishes into results/
USER_RESULTS_DIR = "~/.cache/xmr/results"  # where any other run aimed at the repository's results/ publishes
DEFAULT_RUNS_DIR = "~/.cache/xmr/runs"


# --------------------------------------------------------------------------------------------------- parameters
class ParameterError(ValueError):
    """Every invalid parameter of a notebook run, one line each (``errors``)."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        count = len(self.errors)
        super().__init__(f"{count} invalid parameter{'s' if count > 1 else ''}:\n  " + "\n  ".join(self.errors))


class _Invalid(Exception):
    pass


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


@dataclass(frozen=True)
class Parameter:
    """A spec: ``many=True`` expects a list (a JSON string such as ``"[0, 1]"`` is parsed) of
    ``min_length`` to ``max_length`` items, each checked by :meth:`convert`."""

    many: bool = field(default=False, kw_only=True)
    min_length: int = field(default=0, kw_only=True)
    max_length: int | None = field(default=None, kw_only=True)

    kind = "a value"

    def convert(self, value):
        """The checked scalar value; raises ``_Invalid`` with a message."""
        return value

    def check(self, name: str, value) -> tuple[object, list[str]]:
        """(converted value, error lines)."""
        if not self.many:
            try:
                return self.convert(value), []
            except _Invalid as error:
                return value, [f"{name}: {error}"]
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return value, [f"{name}: expected a list of {self.kind} (JSON such as {self._example()}), "
                               f"got {value!r} (str)"]
        if not isinstance(value, (list, tuple)):
            return value, [f"{name}: expected a list of {self.kind} (such as {self._example()}), got "
                           f"{_describe(value)}"]
        errors, converted = [], []
        for index, item in enumerate(value):
            try:
                converted.append(self.convert(item))
            except _Invalid as error:
                errors.append(f"{name}[{index}]: {error}")
        if len(value) < self.min_length:
            errors.append(f"{name}: needs at least {self.min_length} item{'s' * (self.min_length > 1)}, "
                          f"got {len(value)}")
        if self.max_length is not None and len(value) > self.max_length:
            errors.append(f"{name}: takes at most {self.max_length} items, got {len(value)}")
        return list(converted), errors

    def _example(self) -> str:
        return "[0, 1]"


def _bounds(value, low, high, exclusive: bool) -> None:
    if low is not None and (value < low or (exclusive and value == low)):
        raise _Invalid(f"must be {'>' if exclusive else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (exclusive and value == high)):
        raise _Invalid(f"must be {'<' if exclusive else '<='} {high}, got {value!r}")


@dataclass(frozen=True)
class Integer(Parameter):
    """An ``int`` (not a bool, not ``3.0``) in ``[min, max]``."""

    min: int | None = None
    max: int | None = None
    kind = "integers"

    def convert(self, value) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _Invalid(f"expected an integer, got {_describe(value)}")
        _bounds(int(value), self.min, self.max, False)
        return int(value)


@dataclass(frozen=True)
class Number(Parameter):
    """A finite real number (an int, a float, or a numeric string such as YAML's ``1e-4``), returned as a float,
    in ``[min, max]``; ``exclusive=True`` excludes both bounds."""

    min: float | None = None
    max: float | None = None
    exclusive: bool = False
    kind = "numbers"

    def convert(self, value) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Invalid(f"expected a number, got {_describe(value)}") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Invalid(f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise _Invalid(f"expected a finite number, got {value!r}")
        _bounds(float(value), self.min, self.max, self.exclusive)
        return float(value)

    def _example(self) -> str:
        return "[0.1, 1.0]"


@dataclass(frozen=True)
class Flag(Parameter):
    """``True`` or ``False`` (not 0 / 1, not "yes")."""

    kind = "booleans"

    def convert(self, value) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(f"expected True or False, got {_describe(value)}")
        return value

    def _example(self) -> str:
        return "[true, false]"


@dataclass(frozen=True)
class Text(Parameter):
    """A string, matching ``pattern`` (a full-match regular expression) when one is given."""

    pattern: str | None = None
    kind = "strings"

    def convert(self, value) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_describe(value)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _Invalid(f"{value!r} does not match {self.pattern!r}")
        return value

    def _example(self) -> str:
        return '["a", "b"]'


@dataclass(frozen=True)
class Choices(Parameter):
    """One of ``valid`` (with ``many=True``: a list of them, without repeats). A misspelt name is told the
    closest valid one and every valid one."""

    valid: tuple[str, ...] = ()

    def __init__(self, valid: Iterable[str], *, many: bool = False, min_length: int = 0,
                 max_length: int | None = None):
        object.__setattr__(self, "valid", tuple(valid))
        object.__setattr__(self, "many", many)
        object.__setattr__(self, "min_length", min_length)
        object.__setattr__(self, "max_length", max_length)

    kind = "names"

    def convert(self, value) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected one of {', '.join(self.valid)}; got {_describe(value)}")
        if value not in self.valid:
            close = difflib.get_close_matches(value, self.valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _Invalid(f"unknown name {value!r}{hint} (valid: {', '.join(self.valid)})")
        return value

    def check(self, name: str, value):
        converted, errors = super().check(name, value)
        if self.many and not errors:
            repeated = sorted({item for item in converted if converted.count(item) > 1})
            if repeated:
                errors.append(f"{name}: repeated {', '.join(map(repr, repeated))}")
        return converted, errors

    def _example(self) -> str:
        return json.dumps(list(self.valid[:2]))


@dataclass(frozen=True)
class Folder(Parameter):
    """A path (``~`` and ``$VARIABLES`` expanded; an unset variable is an error), returned as a string.
    ``""`` only when ``empty_ok`` (e.g. ``DATA_ROOT = ""``: read ``$XMR_DATA``); ``must_exist``: an existing
    directory. (Named ``Folder``, not ``Path``, so that it does not shadow :class:`pathlib.Path`.)"""

    empty_ok: bool = False
    must_exist: bool = False
    kind = "paths"

    def convert(self, value) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise _Invalid(f"expected a path, got {_describe(value)}")
        if not value:
            if self.empty_ok:
                return value
            raise _Invalid("expected a path, got an empty string")
        expanded = os.path.expandvars(os.path.expanduser(value))
        unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
        if unset:
            raise _Invalid(f"{value!r} uses unset environment variable(s) {', '.join(unset)}")
        if self.must_exist and not Path(expanded).is_dir():
            raise _Invalid(f"{value!r} is not an existing folder (from {Path.cwd()})")
        return expanded

    def _example(self) -> str:
        return '["a/b", "c"]'


@dataclass(frozen=True)
class RunTag(Parameter):
    """The prefix of a run's result files: a letter, then letters, digits and ``-`` (no ``_``, ``/``, ``.``,
    globs): it only ever names files in its own paper's folder, and never another tag's files."""

    kind = "run tags"

    def convert(self, value) -> str:
        if not isinstance(value, str) or not RUN_TAG.match(value):
            raise _Invalid(f"a run tag is a letter followed by letters, digits or '-' (no '_', '/', '.', '*'), "
                           f"got {_describe(value)}")
        return value

    def _example(self) -> str:
        return '["cpu", "gpu"]'


class Parameters(Mapping):
    """The validated parameters, read-only: ``params["EPOCHS"]`` or ``params.EPOCHS``; lists are tuples."""

    def __init__(self, values: Mapping):
        object.__setattr__(self, "_values", {name: tuple(value) if isinstance(value, list) else value
                                             for name, value in values.items()})

    def __getitem__(self, name: str):
        return self._values[name]

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("parameters are read-only")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Parameters({self._values!r})"


def check_parameters(namespace: MutableMapping, spec: Mapping[str, Parameter], *,
                     constants: Iterable[str] = ()) -> Parameters:
    """Check every parameter of ``spec`` in ``namespace`` (a notebook's ``globals()``) and return them.

    Raises one :class:`ParameterError` listing every problem: a value of the wrong type or out of range, a name
    not among the choices, a parameter missing from the namespace, and any UPPER_CASE name in the namespace that
    is not in ``spec`` (a misspelt ``papermill -p``) unless it is listed in ``constants`` (UPPER_CASE names the
    notebook imports, e.g. ``COMPARISON_ID``) or is a module, class or function. Values that were converted
    (a JSON list string parsed, an int given for a float, ``~`` expanded) are written back into ``namespace``.
    """
    errors, values = [], {}
    for name, parameter in spec.items():
        if not PARAMETER_NAME.match(name):
            raise TypeError(f"parameter names are UPPER_CASE, got {name!r} in the spec")
        if not isinstance(parameter, Parameter):
            raise TypeError(f"spec of {name} is {parameter!r}, not a Parameter (Integer(), Choices(...), ...)")
        if name not in namespace:
            errors.append(f"{name}: missing (the parameters cell does not define it)")
            continue
        values[name], problems = parameter.check(name, namespace[name])
        errors.extend(problems)
    known, constants = list(spec), set(constants)
    for name, value in namespace.items():
        if (not PARAMETER_NAME.match(name) or name in spec or name in constants or callable(value)
                or isinstance(value, types.ModuleType)):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"parameters: {', '.join(known)}"
        errors.append(f"unknown parameter {name}; {hint}")
    if errors:
        raise ParameterError(errors)
    for name, value in values.items():
        if value is not namespace[name]:
            namespace[name] = value
    return Parameters(values)


# --------------------------------------------------------------------------------------------------------- runs
def _check_paper_id(paper_id) -> str:
    if not isinstance(paper_id, str) or not (paper_id in (*PAPER_IDS, COMPARISON_ID) or PLAIN_ID.match(paper_id)):
        raise ValueError(f"paper id must be one of {(*PAPER_IDS, COMPARISON_ID)} or a plain identifier, "
                         f"got {paper_id!r}")
    return paper_id


def _check_run_tag(run_tag) -> str:
    try:
        return RunTag().convert(run_tag)
    except _Invalid as error:
        raise ValueError(f"run tag: {error}") from None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def runs_dir() -> Path:
    """Where staging folders are made: ``$XMR_RUNS``, else ``~/.cache/xmr/runs``; never inside the repository."""
    root = Path(os.path.expanduser(os.environ.get("XMR_RUNS") or DEFAULT_RUNS_DIR)).resolve()
    if _inside(root, REPOSITORY):
        raise ValueError(f"the staging folder {root} ($XMR_RUNS) is inside the repository {REPOSITORY}")
    return root


def _marker(folder: Path, run_tag: str) -> Path:
    return folder / f".{run_tag}.publishing"


@dataclass
class Run:
    """One notebook run: result files are written to ``staging_dir`` and published at the end (:meth:`publish`)."""

    paper_id: str
    run_tag: str
    results_dir: Path  # resolved
    staging_dir: Path  # write_result(run.staging_dir, paper_id, f"{run_tag}_...") writes staging_dir/paper_id/
    published: list[Path] | None = None

    @property
    def target_dir(self) -> Path:
        return self.results_dir / self.paper_id

    def staged(self) -> list[Path]:
        """The checked staged files; raises ``ValueError`` on anything that is not one of this run's results."""
        errors, files = [], []
        for path in sorted(self.staging_dir.rglob("*")):
            relative = path.relative_to(self.staging_dir)
            if path.is_dir() and relative == Path(self.paper_id):
                continue
            if relative.parent != Path(self.paper_id) or path.is_dir() or path.is_symlink():
                errors.append(f"{relative}: not a result file of {self.paper_id}")
            elif not (path.name.startswith(f"{self.run_tag}_") and path.suffix == ".json"):
                errors.append(f"{relative}: not named {self.run_tag}_*.json")
            else:
                try:
                    record = json.loads(path.read_text())
                except (ValueError, UnicodeDecodeError) as error:
                    errors.append(f"{relative}: not JSON ({error})")
                    continue
                if not isinstance(record, dict) or (record.get("paper_id"), record.get("run_name")) != (
                        self.paper_id, path.stem):
                    found = (record.get("paper_id"), record.get("run_name")) if isinstance(record, dict) else None
                    errors.append(f"{relative}: records (paper_id, run_name) {found}, expected "
                                  f"{(self.paper_id, path.stem)}")
                else:
                    files.append(path)
        if errors:
            raise ValueError("refusing to publish:\n  " + "\n  ".join(errors))
        if not files:
            raise ValueError(f"refusing to publish: the run wrote no result file into {self.staging_dir}")
        return files

    def publish(self) -> list[Path]:
        """Replace ``<results_dir>/<paper_id>/<run_tag>_*.json`` by the staged files (see the module docstring)."""
        if self.published is not None:
            raise RuntimeError(f"this run was already published into {self.target_dir}")
        staged = self.staged()
        target = self.target_dir
        target.mkdir(parents=True, exist_ok=True)
        if target.resolve() != self.results_dir / self.paper_id or target.is_symlink():
            raise ValueError(f"{target} resolves to {target.resolve()}, outside {self.results_dir}")
        lock = os.open(target, os.O_RDONLY)
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            for leftover in target.glob(f".{self.run_tag}_*.json.*.publish.tmp"):  # an interrupted publish's
                leftover.unlink()
            names = [path.name for path in staged]
            temporaries = [self._copy_in(path, target) for path in staged]
            self._write_marker(target, names)
            for temporary, name in zip(temporaries, names):
                os.replace(temporary, target / name)
            _fsync_dir(lock)
            for old in sorted(target.glob(f"{self.run_tag}_*.json")):
                if old.name not in names:
                    os.unlink(old)
            _fsync_dir(lock)
            os.unlink(_marker(target, self.run_tag))
            _fsync_dir(lock)
        finally:
            os.close(lock)  # releases the lock
        self.published = [target / name for name in names]
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        return self.published

    @staticmethod
    def _copy_in(source: Path, target: Path) -> Path:
        handle, temporary = tempfile.mkstemp(dir=target, prefix=f".{source.name}.", suffix=".publish.tmp")
        with os.fdopen(handle, "wb") as file:
            file.write(source.read_bytes())
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        return Path(temporary)

    def _write_marker(self, target: Path, names: list[str]) -> None:
        marker = _marker(target, self.run_tag)
        with open(marker, "w") as file:
            json.dump({"run_tag": self.run_tag, "staging_dir": str(self.staging_dir), "files": names}, file)
            file.flush()
            os.fsync(file.fileno())


def _fsync_dir(handle: int) -> None:
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover - some file systems do not sync directories
        pass


def start_run(paper_id: str, run_tag: str, results_dir: str | os.PathLike) -> Run:
    """Check the run's identity and make its fresh, empty staging folder (under :func:`runs_dir`).

    Call it in the cell after the parameters cell, before any work: a bad tag or paper id, a results folder that
    resolves elsewhere, or a smoke/test tag aimed at the repository's own ``results/`` fail here.
    """
    paper_id, run_tag = _check_paper_id(paper_id), _check_run_tag(run_tag)
    results = Path(os.path.expanduser(os.fspath(results_dir))).resolve()
    if run_tag.lower().startswith(SCRATCH_TAG_PREFIXES) and _inside(results, REPOSITORY / "results"):
        raise ValueError(f"a {run_tag!r} run may not publish into the repository's results ({results}); "
                         f"set RESULTS_DIR to a folder outside the repository")
    if _inside(results, REPOSITORY / "results") and os.environ.get(BOOK_RUN_ENV) != "1":
        mine = Path(os.path.expanduser(os.environ.get("XMR_RESULTS") or USER_RESULTS_DIR)).resolve()
        print(f"This run publishes into {mine}, not the book's {results}: the book's results change only under "
              f"its own command (make notebooks, which sets {BOOK_RUN_ENV}=1).")
        results = mine
    marker = _marker(results / paper_id, run_tag)
    if marker.exists():
        warnings.warn(f"an earlier publish of {run_tag!r} into {marker.parent} was interrupted: its "
                      f"{run_tag}_*.json may mix two runs until this run publishes", stacklevel=2)
    parent = runs_dir() / paper_id
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{run_tag}-{datetime.datetime.now().strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    for attempt in range(1000):
        staging = parent / (stem if attempt == 0 else f"{stem}-{attempt}")
        try:
            staging.mkdir()
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover
        raise FileExistsError(f"no fresh staging folder under {parent}")
    return Run(paper_id, run_tag, results, staging)
