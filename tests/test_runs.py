"""Notebook parameters are validated before any work; a run replaces only its own tag's result files, at the end.

Each parameter test is one way a run once went wrong (``EPOCHS -3``, ``EPOCHS ten``, a misspelt ablation, a
misspelt ``-p EPOCH``, ``-p SEEDS "[0]"``, ``-p RUN_TAG ../timofeev2022/cpu``). The run tests check the results
folder byte for byte: after a publish, a refused publish, a failed run, a run killed (SIGKILL) at every step of
its publish, and a papermill run of ``tests/fixtures/run_notebook.ipynb.json`` that fails or does not.
"""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from xmr import runs
from xmr.results import REPOSITORY
from xmr.runs import Choices, Flag, Folder, Integer, Number, ParameterError, RunTag, Text, check_parameters, start_run

FIXTURE = Path(__file__).parent / "fixtures" / "run_notebook.ipynb.json"
PAPER = "testpaper"
OTHER_PAPER = "testother"
LOSSES = ["sum_triplet", "max_triplet", "infonce", "barlow_twins"]
SPEC = {"EPOCHS": Integer(min=1), "SEEDS": Integer(min=0, many=True, min_length=1),
        "LOSSES": Choices(LOSSES, many=True), "LR": Number(min=0, exclusive=True), "RUN_TAG": RunTag(),
        "RESULTS_DIR": Folder(), "FAIL": Flag()}


def defaults(**changes) -> dict:
    return {"EPOCHS": 30, "SEEDS": [0, 1, 2], "LOSSES": ["infonce"], "LR": 1e-4, "RUN_TAG": "cpu",
            "RESULTS_DIR": "../results", "FAIL": False, **changes}


def errors_of(namespace: dict, spec: dict = SPEC) -> list[str]:
    with pytest.raises(ParameterError) as raised:
        check_parameters(namespace, spec)
    assert isinstance(raised.value, ValueError)
    return raised.value.errors


# ------------------------------------------------------------------------------------------------ parameters
def test_valid_parameters_are_returned_read_only():
    params = check_parameters(defaults(), SPEC)
    assert params.EPOCHS == params["EPOCHS"] == 30 and params.SEEDS == (0, 1, 2)
    assert dict(params)["LOSSES"] == ("infonce",) and len(params) == len(SPEC)
    with pytest.raises(AttributeError):
        params.EPOCHS = 3
    with pytest.raises(TypeError):
        params["EPOCHS"] = 3


def test_negative_epochs_rejected():
    assert errors_of(defaults(EPOCHS=-3)) == ["EPOCHS: must be >= 1, got -3"]
    assert errors_of(defaults(EPOCHS=0)) == ["EPOCHS: must be >= 1, got 0"]


@pytest.mark.parametrize("value", ["ten", "3", 3.0, None, [3]])
def test_non_integer_epochs_rejected(value):
    assert errors_of(defaults(EPOCHS=value)) == [f"EPOCHS: expected an integer, got {value!r} "
                                                 f"({type(value).__name__})"]


def test_bool_is_not_an_integer_nor_a_number():
    assert errors_of(defaults(EPOCHS=True)) == ["EPOCHS: expected an integer, got True (bool)"]
    assert errors_of(defaults(LR=False)) == ["LR: expected a number, got False (bool)"]
    assert errors_of(defaults(SEEDS=[0, True])) == ["SEEDS[1]: expected an integer, got True (bool)"]
    assert errors_of(defaults(FAIL=1)) == ["FAIL: expected True or False, got 1 (int)"]


def test_numbers_bounds_and_conversions():
    assert errors_of(defaults(LR=0)) == ["LR: must be > 0, got 0.0"]
    assert errors_of(defaults(LR=float("nan"))) == ["LR: expected a finite number, got nan"]
    assert errors_of(defaults(LR="fast")) == ["LR: expected a number, got 'fast' (str)"]
    namespace = defaults(LR="1e-4")  # YAML reads 1e-4 (no dot) as a string
    assert check_parameters(namespace, SPEC).LR == 1e-4 and namespace["LR"] == 1e-4
    fraction = {"F": Number(min=0, max=1)}
    assert check_parameters({"F": 1}, fraction).F == 1.0
    assert errors_of({"F": 1.5}, fraction) == ["F: must be <= 1, got 1.5"]


def test_misspelt_choice_names_the_closest_and_every_valid_one():
    (error,) = errors_of(defaults(LOSSES=["infonce", "max_tripplet"]))
    assert error.startswith("LOSSES[1]: unknown name 'max_tripplet'; did you mean 'max_triplet'?")
    assert all(loss in error for loss in LOSSES)
    (error,) = errors_of({"FORM": "literall"}, {"FORM": Choices(["literal", "infonce_margin"])})
    assert "did you mean 'literal'?" in error and "infonce_margin" in error
    (error,) = errors_of({"FORM": "zzz"}, {"FORM": Choices(["literal", "infonce_margin"])})
    assert "did you mean" not in error and "valid: literal, infonce_margin" in error


def test_repeated_choice_rejected():
    assert errors_of(defaults(LOSSES=["infonce", "infonce"])) == ["LOSSES: repeated 'infonce'"]


def test_unknown_upper_case_name_rejected_with_suggestion():
    assert errors_of({**defaults(), "EPOCH": 3}) == ["unknown parameter EPOCH; did you mean EPOCHS?"]
    (error,) = errors_of({**defaults(), "QWERTY": 1})
    assert error.startswith("unknown parameter QWERTY; parameters: EPOCHS, SEEDS")


def test_imports_and_lower_case_names_are_not_parameters():
    namespace = {**defaults(), "COMPARISON_ID": "comparison", "TrainConfig": object, "torch_threads": 1,
                 "OS": os, "MAKE": lambda: None, "_HIDDEN": 1}
    assert errors_of(namespace) == ["unknown parameter COMPARISON_ID; parameters: EPOCHS, SEEDS, LOSSES, LR, "
                                    "RUN_TAG, RESULTS_DIR, FAIL"]
    check_parameters(namespace, SPEC, constants=["COMPARISON_ID"])


def test_missing_parameter_rejected():
    namespace = defaults()
    del namespace["LR"]
    assert errors_of(namespace) == ["LR: missing (the parameters cell does not define it)"]


def test_json_list_string_is_parsed_and_written_back():
    namespace = defaults(SEEDS="[0, 1]", LOSSES='["infonce", "max_triplet"]')
    params = check_parameters(namespace, SPEC)
    assert namespace["SEEDS"] == [0, 1] and namespace["LOSSES"] == ["infonce", "max_triplet"]
    assert params.SEEDS == (0, 1)
    assert check_parameters(defaults(SEEDS="[0]"), SPEC).SEEDS == (0,)


@pytest.mark.parametrize("value, message", [
    ("[0", "SEEDS: expected a list of integers (JSON such as [0, 1]), got '[0' (str)"),
    (0, "SEEDS: expected a list of integers (such as [0, 1]), got 0 (int)"),
    ('{"a": 1}', "SEEDS: expected a list of integers (such as [0, 1]), got {'a': 1} (dict)"),
    ("[]", "SEEDS: needs at least 1 item, got 0"),
    ('["0"]', "SEEDS[0]: expected an integer, got '0' (str)"),
])
def test_bad_lists_rejected(value, message):
    namespace = defaults(SEEDS=value)
    assert errors_of(namespace) == [message]
    assert namespace["SEEDS"] == value  # nothing is written back when a check fails


def test_every_error_is_reported_together():
    namespace = {**defaults(EPOCHS="ten", SEEDS="[0, -1]", LOSSES=["infonc"], LR=-1.0,
                            RUN_TAG="../timofeev2022/cpu", RESULTS_DIR=3, FAIL="yes"), "EPOCH": 3}
    with pytest.raises(ParameterError) as raised:
        check_parameters(namespace, SPEC)
    errors = raised.value.errors
    assert [error.split(":")[0].split("[")[0].split(";")[0] for error in errors] == [
        "EPOCHS", "SEEDS", "LOSSES", "LR", "RUN_TAG", "RESULTS_DIR", "FAIL", "unknown parameter EPOCH"]
    assert str(raised.value).startswith("8 invalid parameters:\n  EPOCHS:")
    assert namespace["SEEDS"] == "[0, -1]"


def test_text_and_folder():
    assert errors_of({"DEVICE": "gpu"}, {"DEVICE": Text(pattern=r"auto|cpu|cuda(:\d+)?")}) == [
        r"DEVICE: 'gpu' does not match 'auto|cpu|cuda(:\\d+)?'"]
    assert check_parameters({"D": ""}, {"D": Folder(empty_ok=True)}).D == ""
    assert errors_of({"D": ""}, {"D": Folder()}) == ["D: expected a path, got an empty string"]
    assert check_parameters({"D": "~/x"}, {"D": Folder()}).D == os.path.expanduser("~/x")
    os.environ.pop("XMR_UNSET_FOR_TEST", None)
    assert errors_of({"D": "$XMR_UNSET_FOR_TEST/x"}, {"D": Folder()}) == [
        "D: '$XMR_UNSET_FOR_TEST/x' uses unset environment variable(s) XMR_UNSET_FOR_TEST"]


BAD_TAGS = ["../timofeev2022/cpu", "..", ".", "a/b", "/cpu", "cpu*", "cpu?", "cpu.x", "", "cpu_fast", " cpu", "1cpu"]


@pytest.mark.parametrize("tag", BAD_TAGS + [3, None])
def test_bad_run_tags_rejected(tag, tmp_path, monkeypatch):
    monkeypatch.setenv("XMR_RUNS", str(tmp_path / "runs"))
    (error,) = errors_of(defaults(RUN_TAG=tag))
    assert error.startswith("RUN_TAG: a run tag is a letter")
    with pytest.raises(ValueError, match="run tag"):
        start_run(PAPER, tag, tmp_path / "results")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("tag", ["cpu", "gpu", "smoke", "cpu-fast", "Run2"])
def test_good_run_tags_accepted(tag):
    assert check_parameters(defaults(RUN_TAG=tag), SPEC).RUN_TAG == tag


@pytest.mark.parametrize("paper_id", ["../drcl2024", "drcl2024/..", "", "a b", "*", ".hidden"])
def test_bad_paper_ids_rejected(paper_id, tmp_path, monkeypatch):
    monkeypatch.setenv("XMR_RUNS", str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="paper id"):
        start_run(paper_id, "cpu", tmp_path / "results")


# ----------------------------------------------------------------------------------------------------- runs
def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) and its bytes."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def fake_record(paper_id: str, run_name: str, value) -> bytes:
    return json.dumps({"paper_id": paper_id, "run_name": run_name, "metrics": {"value": value}}).encode()


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    """A results folder with an earlier ``cpu`` run (a, b, c), a ``gpu`` and a ``cpu-x`` run, and another paper."""
    monkeypatch.setenv("XMR_RUNS", str(tmp_path / "runs"))
    folder = tmp_path / "results"
    for paper, name in [(PAPER, "cpu_a"), (PAPER, "cpu_b"), (PAPER, "cpu_c"), (PAPER, "gpu_a"),
                        (PAPER, "cpu-x_a"), (PAPER, "cpux_a"), (OTHER_PAPER, "cpu_a")]:
        (folder / paper).mkdir(parents=True, exist_ok=True)
        (folder / paper / f"{name}.json").write_bytes(fake_record(paper, name, "old"))
    (folder / PAPER / "notes.txt").write_text("not a result")
    return folder


def stage(run, *names, value="new"):
    """Stage result files as a notebook would (``publish`` reads only their ``paper_id`` and ``run_name``; the
    fixture notebook below stages real ``write_result`` files)."""
    (run.staging_dir / run.paper_id).mkdir(exist_ok=True)
    for name in names:
        (run.staging_dir / run.paper_id / f"{name}.json").write_bytes(fake_record(run.paper_id, name, value))


def tag_files(folder: Path, tag: str = "cpu") -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((folder / PAPER).glob(f"{tag}_*.json"))}


def test_staging_dir_is_fresh_and_outside_the_repository(results, tmp_path):
    first, second = start_run(PAPER, "cpu", results), start_run(PAPER, "cpu", results)
    for run in (first, second):
        assert run.staging_dir.is_dir() and not any(run.staging_dir.iterdir())
        assert run.staging_dir.parent == tmp_path / "runs" / PAPER
        assert run.staging_dir.name.startswith("cpu-") and f"-{os.getpid()}" in run.staging_dir.name
        assert REPOSITORY not in run.staging_dir.parents
    assert first.staging_dir != second.staging_dir


def test_staging_inside_the_repository_refused(results, monkeypatch):
    monkeypatch.setenv("XMR_RUNS", str(REPOSITORY / "_build" / "runs"))
    with pytest.raises(ValueError, match="inside the repository"):
        start_run(PAPER, "cpu", results)


def test_default_staging_dir_is_the_user_cache(monkeypatch):
    monkeypatch.delenv("XMR_RUNS", raising=False)
    assert runs.runs_dir() == Path("~/.cache/xmr/runs").expanduser().resolve()


@pytest.mark.parametrize("tag", ["smoke", "smoke-gpu", "test"])
def test_smoke_runs_may_not_publish_into_the_repository_results(tag, tmp_path, monkeypatch):
    monkeypatch.setenv("XMR_RUNS", str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="may not publish into the repository's results"):
        start_run(PAPER, tag, REPOSITORY / "results")
    with pytest.raises(ValueError, match="may not publish"):
        start_run(PAPER, tag, REPOSITORY / "notebooks" / ".." / "results")
    assert start_run(PAPER, tag, tmp_path / "elsewhere").staging_dir.is_dir()


def test_publish_replaces_exactly_its_own_tag(results):
    before = snapshot(results)
    run = start_run(PAPER, "cpu", results)
    stage(run, "cpu_b", "cpu_d")
    assert snapshot(results) == before  # staging writes nothing into results
    published = run.publish()
    assert [path.name for path in published] == ["cpu_b.json", "cpu_d.json"]
    after = snapshot(results)
    assert sorted(tag_files(results)) == ["cpu_b.json", "cpu_d.json"]
    for name in ("cpu_b", "cpu_d"):
        record = json.loads(after[f"{PAPER}/{name}.json"])
        assert (record["paper_id"], record["run_name"], record["metrics"]) == (PAPER, name, {"value": "new"})
    untouched = {key: value for key, value in before.items() if not key.startswith(f"{PAPER}/cpu_")}
    assert {key: after[key] for key in untouched} == untouched  # gpu, cpu-x, cpux, the other paper, notes.txt
    assert set(after) == set(untouched) | {f"{PAPER}/cpu_b.json", f"{PAPER}/cpu_d.json"}  # nothing hidden left
    assert not run.staging_dir.exists()
    with pytest.raises(RuntimeError, match="already published"):
        run.publish()


def test_publish_into_a_new_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XMR_RUNS", str(tmp_path / "runs"))
    run = start_run(PAPER, "gpu", tmp_path / "fresh")
    stage(run, "gpu_main")
    run.publish()
    assert sorted(snapshot(tmp_path / "fresh")) == [f"{PAPER}/gpu_main.json"]


def test_failed_run_leaves_results_identical(results):
    before = snapshot(results)
    with pytest.raises(RuntimeError):
        run = start_run(PAPER, "cpu", results)
        stage(run, "cpu_a", "cpu_z")
        raise RuntimeError("training diverged")
    assert snapshot(results) == before


def refused(results, run, match):
    before = snapshot(results)
    with pytest.raises(ValueError, match=match):
        run.publish()
    assert snapshot(results) == before
    assert run.published is None


def test_publish_refuses_an_empty_run(results):
    refused(results, start_run(PAPER, "cpu", results), "wrote no result file")


def test_publish_refuses_another_tags_file(results):
    run = start_run(PAPER, "cpu", results)
    stage(run, "cpu_a", "gpu_a")
    refused(results, run, r"gpu_a.json: not named cpu_\*.json")


def test_publish_refuses_another_papers_file(results):
    run = start_run(PAPER, "cpu", results)
    stage(run, "cpu_a")
    (run.staging_dir / OTHER_PAPER).mkdir()
    (run.staging_dir / OTHER_PAPER / "cpu_a.json").write_bytes(fake_record(OTHER_PAPER, "cpu_a", "new"))
    refused(results, run, f"{OTHER_PAPER}/cpu_a.json: not a result file of {PAPER}")


@pytest.mark.parametrize("content", [
    fake_record(OTHER_PAPER, "cpu_a", 1), fake_record(PAPER, "cpu_b", 1), b"not json", b"[1, 2]"])
def test_publish_refuses_a_file_whose_record_disagrees_with_its_name(results, content):
    run = start_run(PAPER, "cpu", results)
    stage(run, "cpu_z")
    (run.staging_dir / PAPER / "cpu_a.json").write_bytes(content)
    refused(results, run, "cpu_a.json: (records|not JSON)")


def test_publish_refuses_a_paper_folder_that_resolves_elsewhere(results, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (results / "testlinked").symlink_to(elsewhere)
    run = start_run("testlinked", "cpu", results)
    stage(run, "cpu_a")
    refused(results, run, "outside")
    assert not any(elsewhere.iterdir())


OLD, NEW = ["cpu_a.json", "cpu_b.json", "cpu_c.json"], ["cpu_b.json", "cpu_d.json"]
KILL_POINTS = ["copy:0", "copy:1", "replace:0", "replace:1", "unlink:0", "unlink:1", "marker:0"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_during_publish_never_loses_a_file(results, point):
    """A child process publishes and SIGKILLs itself just before a chosen file operation: the copy of the
    n-th temporary file, the n-th rename into place, the n-th removal of an old file, the marker's removal."""
    before = snapshot(results)
    run = start_run(PAPER, "cpu", results)
    stage(run, "cpu_b", "cpu_d")
    new_bytes = {path.name: path.read_bytes() for path in (run.staging_dir / PAPER).iterdir()}
    operation, index = point.split(":")
    pid = os.fork()
    if pid == 0:  # the child: count the chosen operation, die before the index-th one
        try:
            calls = {"copy": 0, "replace": 0, "unlink": 0, "marker": 0}

            def dying(kind, real):
                def call(*args, **kwargs):
                    name = str(args[0])
                    kind_here = "marker" if kind == "unlink" and name.endswith(".publishing") else kind
                    if kind_here == operation:
                        if calls[kind_here] == int(index):
                            os.kill(os.getpid(), signal.SIGKILL)
                        calls[kind_here] += 1
                    return real(*args, **kwargs)
                return call

            runs.Run._copy_in = staticmethod(dying("copy", runs.Run._copy_in))
            runs.os.replace = dying("replace", os.replace)
            runs.os.unlink = dying("unlink", os.unlink)
            run.publish()
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"child ended with {status}"

    after = snapshot(results)
    others = {key: value for key, value in before.items() if not key.startswith(f"{PAPER}/cpu_")}
    assert {key: after.get(key) for key in others} == others  # other tags and papers byte-identical
    present = tag_files(results)
    # the whole old set stays until the whole new set is in place; only then do obsolete old files go
    assert set(OLD) <= set(present) or set(NEW) <= set(present)
    assert len(present) >= len(OLD) or set(present) == set(NEW)
    assert set(present) <= set(OLD) | set(NEW)
    for name, content in present.items():
        assert content in (before.get(f"{PAPER}/{name}"), new_bytes.get(name))
    hidden = sorted(name for name in after if Path(name).name.startswith("."))
    assert all(name.endswith((".publish.tmp", ".publishing")) for name in hidden)

    # the interruption is noticed, and publishing the tag again repairs it
    if (results / PAPER / ".cpu.publishing").exists():
        with pytest.warns(UserWarning, match="was interrupted"):
            rerun = start_run(PAPER, "cpu", results)
    else:
        rerun = start_run(PAPER, "cpu", results)
    stage(rerun, "cpu_b", "cpu_d")
    rerun.publish()
    final = snapshot(results)
    assert sorted(tag_files(results)) == NEW
    assert set(final) == set(others) | {f"{PAPER}/{name}" for name in NEW}


# ------------------------------------------------------------------------------------ a notebook, end to end
def execute(tmp_path: Path, results: Path, **parameters):
    import papermill

    notebook = tmp_path / "run_notebook.ipynb"
    shutil.copyfile(FIXTURE, notebook)
    return papermill.execute_notebook(str(notebook), str(tmp_path / "executed.ipynb"), kernel_name="python3",
                                      parameters={"RESULTS_DIR": str(results), **parameters}, cwd=str(tmp_path),
                                      progress_bar=False, execution_timeout=120)


def test_notebook_run_publishes_only_when_it_completes(results, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    (results / PAPER / "cpu_seed0.json").write_bytes(fake_record(PAPER, "cpu_seed0", "old"))
    before = snapshot(results)
    with pytest.raises(PapermillExecutionError, match="injected failure"):
        execute(tmp_path, results, FAIL=True, SEEDS="[0, 1]")
    assert snapshot(results) == before
    staged = list((tmp_path / "runs" / PAPER).glob("cpu-*/testpaper/*.json"))
    assert sorted(path.name for path in staged) == ["cpu_seed0.json", "cpu_seed1.json"]  # written, not published

    execute(tmp_path, results, FAIL=False, SEEDS="[0, 1]", MODE="slow")
    after = snapshot(results)
    assert sorted(tag_files(results)) == ["cpu_seed0.json", "cpu_seed1.json"]
    for seed in (0, 1):
        record = json.loads(after[f"{PAPER}/cpu_seed{seed}.json"])
        assert (record["metrics"], record["mode"]) == ({"value": seed}, "slow")
        assert record["parameters"]["SEEDS"] == [0, 1]
    others = {key: value for key, value in before.items() if not key.startswith(f"{PAPER}/cpu_")}
    assert {key: after[key] for key in others} == others
    assert set(after) == set(others) | {f"{PAPER}/cpu_seed0.json", f"{PAPER}/cpu_seed1.json"}


def test_notebook_with_a_misspelt_parameter_stops_before_any_work(results, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    before = snapshot(results)
    with pytest.raises(PapermillExecutionError) as raised:
        execute(tmp_path, results, SEED=[0], MODE="fsat", RUN_TAG="../testother/cpu")
    message = str(raised.value)
    assert "ParameterError: 3 invalid parameters" in message
    assert "unknown parameter SEED; did you mean SEEDS?" in message and "did you mean 'fast'?" in message
    assert snapshot(results) == before and not (tmp_path / "runs").exists()


def test_only_the_book_run_publishes_into_the_repository(tmp_path, monkeypatch):
    """A run aimed at the repository's results/ publishes there only under `make notebooks` (XMR_BOOK_RUN=1);
    any other run (papermill by hand, JupyterLab) goes to the user's results folder, so git status stays clean."""
    monkeypatch.setenv("XMR_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("XMR_RESULTS", str(tmp_path / "mine"))
    monkeypatch.delenv(runs.BOOK_RUN_ENV, raising=False)
    assert start_run(PAPER, "cpu", REPOSITORY / "results").results_dir == (tmp_path / "mine").resolve()
    assert start_run(PAPER, "cpu", tmp_path / "elsewhere").results_dir == (tmp_path / "elsewhere").resolve()
    monkeypatch.setenv(runs.BOOK_RUN_ENV, "1")
    assert start_run(PAPER, "cpu", REPOSITORY / "results").results_dir == (REPOSITORY / "results").resolve()
