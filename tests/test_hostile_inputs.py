"""Hostile inputs and damaged state, as an adversarial user would try them: every one is refused
with exit status 2 and one line on stderr, no traceback, and nothing written outside the
locations the command was given."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fidelity.applications.explain import check_explained_point
from fidelity.cli import main
from fidelity.core.errors import FidelityError
from fidelity.core.locations import check_writable, claim_path, claimed
from tests.fidelity.test_cache import dead_pid
from tests.fidelity.user_problems import tiny_text_problem

REPO = Path(__file__).resolve().parents[1]
UNWRITABLE = Path("/proc/fidelity-cannot-write-here")  # refused even to root

TINY = """
name = "{name}"
problems = ["{problem}"]
[selection]
test_points = 4
random = 6
top = 4
[metrics]
bootstrap = {bootstrap}
[[estimators]]
kind = "{estimator}"
label = "{label}"
[[responses]]
kind = "cold"
"""


def suite_text(
    *,
    name: str = "tiny",
    problem: str = "tests.fidelity.user_problems:tiny",
    estimator: str = "exact",
    label: str = "exact",
    bootstrap: int = 20,
) -> str:
    return TINY.format(
        name=name, problem=problem, estimator=estimator, label=label, bootstrap=bootstrap
    )


def cli(arguments: list[object]) -> int:
    return main([str(argument) for argument in arguments])


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory holding a suite file; default run directories, cache and history all
    land inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FIDELITY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FIDELITY_HISTORY", str(tmp_path / "history.db"))
    (tmp_path / "suite.toml").write_text(suite_text())
    return tmp_path


STAGE_LINE = re.compile(r"fidelity: \d\d:\d\d:\d\d ")


def refused(capsys, code: int, message: str) -> str:
    """The command exited 2 with one error line holding ``message`` (after any stage lines the
    work done before the error logged)."""
    err = capsys.readouterr().err
    err = "".join(line for line in err.splitlines(True) if not STAGE_LINE.match(line))
    assert code == 2, err
    assert err.startswith("fidelity: error: "), err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert message in err, err
    return err


def unchanged(root: Path, before: dict[str, tuple[int, int]]) -> None:
    after = snapshot(root)
    assert after == before, sorted(set(after) ^ set(before))
    assert not list(root.rglob(".*.partial-*")) and not list(root.rglob(".*.claim*"))


# --- problems validated before any training -----------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("mse_wider_outputs", "they must match exactly (nothing is broadcast)"),
        ("bce_not_binary", "bce targets y_train must be 0 or 1"),
        ("label_out_of_range", "y_train holds class index 7, but the model has 3 outputs"),
        ("negative_label", "y_train holds class index -1"),
        ("label_out_of_range_in_test_split", "y_test holds class index 3"),
        ("output_too_narrow", "cross_entropy needs one output per class"),
        ("wrong_input_width", "the model failed on one train row: RuntimeError"),
        ("empty_test_split", "the test split is empty"),
        ("exits_cleanly", "it called sys.exit(0)"),
        ("exits_with_three", "it called sys.exit(3)"),
        ("too_big_for_newton", "Newton training of 'tiny-logreg' (203603 parameters"),
    ],
)
def test_a_bad_problem_is_refused_before_training(factory, message, workspace, capsys):
    before = snapshot(workspace)
    problem = f"tests.fidelity.user_problems:{factory}"
    code = cli(["run", "suite.toml", "--problem", problem, "--out", "run"])
    refused(capsys, code, message)
    unchanged(workspace, before)
    assert not (workspace / "run").exists() and not (workspace / "cache").exists()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        ("exits_at_import", "cannot import module 'tests.fidelity.exits_at_import'"),
        ("interrupts_at_import", ": KeyboardInterrupt"),
    ],
)
def test_a_user_module_that_exits_or_interrupts_at_import_is_one_line(
    module, message, workspace, capsys
):
    before = snapshot(workspace)
    code = cli(["run", "suite.toml", "--problem", f"tests.fidelity.{module}:x", "--out", "run"])
    refused(capsys, code, message)
    unchanged(workspace, before)


def test_a_bad_second_problem_stops_the_run_before_the_first_trains(workspace, capsys):
    (workspace / "two.toml").write_text(
        suite_text().replace(
            'problems = ["tests.fidelity.user_problems:tiny"]',
            'problems = ["tests.fidelity.user_problems:tiny", '
            '"tests.fidelity.user_problems:negative_label"]',
        )
    )
    before = snapshot(workspace)
    refused(capsys, cli(["run", "two.toml", "--out", "run"]), "class index -1")
    unchanged(workspace, before)
    assert not (workspace / "cache").exists()  # nothing trained, nothing cached


def test_the_memory_refusal_follows_the_limit_it_is_given(workspace, capsys, monkeypatch):
    # The tiny problem's dense Hessians are a few KB: refused under a 1 KB budget.
    monkeypatch.setenv("FIDELITY_MEMORY_LIMIT", "1000")
    refused(capsys, cli(["run", "suite.toml", "--out", "run"]), "needs at least")
    monkeypatch.setenv("FIDELITY_MEMORY_LIMIT", "lots")
    refused(capsys, cli(["run", "suite.toml", "--out", "run"]), "FIDELITY_MEMORY_LIMIT")


# --- suite files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            suite_text(estimator="tests.fidelity.user_estimators:NotAnEstimator"),
            "NotAnEstimator must subclass fidelity.estimators.base.Estimator",
        ),
        (suite_text(problem="digits-logreg[seed=1,seed=2]"), "option(s) seed given twice"),
        (suite_text(name=""), "name '' must be 1-100 letters"),
        (suite_text(name="../../escaped"), "name '../../escaped' must be"),
        (suite_text(name="/tmp/absolute"), "name '/tmp/absolute' must be"),
        (suite_text(bootstrap=1_000_000_000_000), "bootstrap <= 100,000"),
        (suite_text(label=" padded"), "label ' padded' must be"),
        (suite_text(label="bell\\u0007"), "must be 1-100 printable characters"),
        (
            suite_text(estimator="replay", label="replay"),
            "estimator 'replay': replay needs a problem trained by minibatch steps; 'tiny-logreg' "
            "is trained by full-batch Newton",
        ),
        (
            suite_text(
                problem="tests.fidelity.user_problems:tiny_minibatch",
                estimator="tracin-cp",
                label="tracin",
            ).replace('label = "tracin"\n', 'label = "tracin"\ncheckpoints = 50\n'),
            "estimator 'tracin': tracin-cp.checkpoints is 50, but the run of 'tiny-logreg' has "
            "only 20 steps",
        ),
        (
            suite_text(
                problem="tests.fidelity.user_problems:tiny_minibatch",
                estimator="source",
                label="source",
            ).replace('label = "source"\n', 'label = "source"\nsegments = 21\n'),
            "source.segments is 21, but the run of 'tiny-logreg' has only 20 steps",
        ),
        (
            suite_text(estimator="trak", label="trak").replace(
                'label = "trak"\n', 'label = "trak"\nprojection_dim = 0\n'
            ),
            "trak.projection_dim must be",
        ),
        (
            suite_text(estimator="trak", label="trak").replace(
                'label = "trak"\n', 'label = "trak"\nprojection_dim = 13\n'
            ),
            "trak.projection_dim is 13, but the model has 12 parameters",
        ),
        (
            suite_text(estimator="trak", label="trak").replace(
                'label = "trak"\n', 'label = "trak"\nensemble_size = 0\n'
            ),
            "trak.ensemble_size must be",
        ),
    ],
)
def test_a_bad_suite_is_refused_and_writes_nowhere(text, message, workspace, capsys):
    (workspace / "bad.toml").write_text(text)
    before = snapshot(workspace)
    refused(capsys, cli(["run", "bad.toml"]), message)  # no --out: the default location
    unchanged(workspace, before)
    assert not (workspace / "runs").exists()
    assert not (workspace.parent.parent / "escaped").exists()


def test_a_suite_file_that_is_not_utf8_is_one_line(workspace, capsys):
    (workspace / "latin1.toml").write_bytes(
        suite_text().replace("tiny", "caf\xe9").encode("latin-1")
    )
    refused(capsys, cli(["run", "latin1.toml"]), "is not UTF-8 text")


def test_a_dollar_in_a_label_is_drawn_literally(workspace, capsys):
    (workspace / "dollar.toml").write_text(suite_text(label="$x^$ 50$"))
    assert cli(["run", "dollar.toml", "--out", "run", "--no-history"]) == 0
    capsys.readouterr()
    assert (workspace / "run" / "figures" / "tiny-logreg.png").stat().st_size > 0
    assert "$x^$ 50$" in (workspace / "run" / "results.json").read_text()


# --- output locations checked before compute ----------------------------------------------------


needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--out", str(UNWRITABLE)], "run directory '/proc/fidelity-cannot-write-here' is not"),
        (["--cache-dir", str(UNWRITABLE)], "cache directory '/proc/fidelity-cannot-write-here'"),
        (["--history", str(UNWRITABLE / "h.db")], "run history"),
        (["--history", "."], "run history '.' is a directory"),
    ],
)
def test_an_unwritable_location_is_refused_before_compute(options, message, workspace, capsys):
    before = snapshot(workspace)
    arguments = ["run", "suite.toml", *options]
    if "--out" not in options:
        arguments += ["--out", "run"]
    refused(capsys, cli(arguments), message)
    unchanged(workspace, before)
    assert not (workspace / "cache").exists()


def test_a_file_that_is_not_a_history_is_never_overwritten(workspace, capsys):
    notes = workspace / "notes.txt"
    notes.write_text("x")  # SQLite would take a 1-byte file for an empty database
    refused(capsys, cli(["run", "suite.toml", "--history", notes, "--out", "run"]), "not an SQLite")
    assert notes.read_text() == "x" and not (workspace / "run").exists()


@needs_proc
def test_application_and_figure_outputs_are_checked_before_compute(workspace, capsys):
    code = cli(["explain", "tests.fidelity.user_problems:tiny", "--test", "0", "--out", UNWRITABLE])
    refused(capsys, code, "output directory '/proc/fidelity-cannot-write-here' is not writable")
    refused(capsys, cli(["figures", "lds-loo-table", "--out", UNWRITABLE]), "output directory")
    assert not (workspace / "cache").exists()


def test_explain_refuses_a_label_it_would_ignore_or_cannot_use(workspace, capsys):
    tiny = "tests.fidelity.user_problems:tiny"
    code = cli(["explain", tiny, "--test", "0", "--label", "99", "--out", "e"])
    refused(capsys, code, "a label goes with a text")
    assert not (workspace / "e").exists() and not (workspace / "cache").exists()
    text = tiny_text_problem()
    encoding = dataclasses.replace(text, featurize=lambda texts: text.x_test[: len(texts)])
    for label in (99, -1):
        with pytest.raises(FidelityError, match=f"label {label} is not a class"):
            check_explained_point(encoding, None, "a fine film", label)
    check_explained_point(encoding, None, "a fine film", 1)
    with pytest.raises(FidelityError, match="cannot encode new text"):
        check_explained_point(text, None, "a fine film", None)


TINY_PROBLEM = "tests.fidelity.user_problems:tiny"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["perturb", TINY_PROBLEM, "--eps", "0"], "eps must be positive"),
        (["attack", TINY_PROBLEM, "--budget", "50"], "exceeds the width of the data range"),
        (["attack", TINY_PROBLEM, "--budget", "-1"], "budget must be a positive"),
        (["attack", TINY_PROBLEM, "--range", "2", "1"], "low < high"),
        (
            ["attack", "tests.fidelity.user_problems:integer_inputs"],
            "x_train must be a floating-point tensor",
        ),
        (["attack", TINY_PROBLEM, "--estimator", "grad-cos"], "ranking score"),
        (["perturb", TINY_PROBLEM, "--estimator", "gnh", "--estimator", "cg"], "one --estimator"),
    ],
)
def test_perturbation_commands_refuse_bad_input_in_one_line(arguments, message, workspace, capsys):
    if "--estimator" not in arguments:
        arguments = [*arguments, "--estimator", "exact"]
    refused(capsys, cli([*arguments, "--out", "p", "--no-history"]), message)
    assert not (workspace / "p").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--grid", "0", "--grid", "1"], "positive and finite"),
        (["--grid", "1"], "at least two"),
        (["--estimator", "grad-dot"], "no damping to sweep"),
        (["--estimator", "trak[projection_dim=0]"], "projection_dim must be"),
    ],
)
def test_damping_command_refuses_bad_input_in_one_line(arguments, message, workspace, capsys):
    command = ["damping", TINY_PROBLEM, *arguments, "--subsets", "3", "--out", "d"]
    refused(capsys, cli([*command, "--no-history"]), message)
    assert not (workspace / "d").exists()


def test_check_writable_probes_by_writing(tmp_path):
    check_writable(tmp_path / "new" / "deeper", "run directory", directory=True)
    assert not (tmp_path / "new").exists()  # probed, not created
    (tmp_path / "plain").write_text("x")
    with pytest.raises(FidelityError, match="is not a directory"):
        check_writable(tmp_path / "plain", "cache directory", directory=True)
    with pytest.raises(FidelityError, match="plain' is not a directory"):
        check_writable(tmp_path / "plain" / "h.db", "run history", directory=False)
    if Path("/proc/self").is_dir():
        with pytest.raises(FidelityError, match="is not writable"):
            check_writable(UNWRITABLE / "x", "run directory", directory=True)


# --- the history: a lock is waited for, then refused with the run directory kept -----------------


def test_a_locked_history_keeps_the_run_and_says_how_to_record_it(workspace, capsys, monkeypatch):
    history = workspace / "history.db"
    assert cli(["run", "suite.toml", "--out", "first"]) == 0
    reader = sqlite3.connect(history, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM runs").fetchone()  # holds a shared lock
    monkeypatch.setenv("FIDELITY_HISTORY_WAIT", "1")
    try:
        capsys.readouterr()
        err = refused(capsys, cli(["run", "suite.toml", "--out", "second"]), "still locked")
    finally:
        reader.execute("ROLLBACK")
        reader.close()
    assert "fidelity record 'second' --history" in err
    assert (workspace / "second" / "results.json").is_file()
    assert cli(["record", "second"]) == 0
    (count,) = sqlite3.connect(history).execute("SELECT COUNT(*) FROM runs").fetchone()
    assert count == 2
    assert cli(["record", "second"]) == 2  # recorded once, never twice
    assert "already in history" in capsys.readouterr().err


def test_a_brief_lock_is_waited_out(workspace, capsys, monkeypatch):
    history = workspace / "history.db"
    assert cli(["run", "suite.toml", "--out", "first"]) == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(2)\n"
            "c.execute('ROLLBACK')\n",
            str(history),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setenv("FIDELITY_HISTORY_WAIT", "30")
    assert cli(["run", "suite.toml", "--out", "second"]) == 0
    holder.wait(timeout=30)
    (count,) = sqlite3.connect(history).execute("SELECT COUNT(*) FROM runs").fetchone()
    assert count == 2


# --- one winner per --out ---------------------------------------------------------------------


def test_a_run_directory_held_by_a_live_run_is_refused_at_once(workspace, capsys):
    before = snapshot(workspace)
    with claimed(workspace / "run"):
        code = cli(["run", "suite.toml", "--out", "run"])
    refused(capsys, code, f"is being written by another fidelity run (pid {os.getpid()})")
    assert not (workspace / "run").exists() or not any((workspace / "run").iterdir())
    assert snapshot(workspace) == before


def test_a_dead_run_s_claim_is_taken_over(workspace, capsys):
    claim_path(workspace / "run").write_text(str(dead_pid()))
    assert cli(["run", "suite.toml", "--out", "run", "--no-history"]) == 0
    assert (workspace / "run" / "results.json").is_file()
    assert not claim_path(workspace / "run").exists()


@pytest.mark.slow
def test_two_processes_racing_for_one_out_leave_one_winner(workspace):
    command = [sys.executable, "-m", "fidelity.cli", "run", "suite.toml", "--out", "race"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen(
            [*command, "--no-history"],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    finished = [(racer.wait(timeout=300), racer.stderr.read()) for racer in racers]
    codes = sorted(code for code, _ in finished)
    assert codes == [0, 2], finished
    loser = next(err for code, err in finished if code == 2)
    assert "Traceback" not in loser and loser.count("\n") == 1
    assert "race" in loser and ("another fidelity run" in loser or "not empty" in loser)
    assert json.loads((workspace / "race" / "results.json").read_text())["problems"]


# --- damaged run directories given to report and check ------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    (root / "suite.toml").write_text(suite_text())
    assert cli(["run", str(root / "suite.toml"), "--out", str(root / "run"), "--no-history"]) == 0
    return root / "run"


def _edit(change):
    def mutate(run: Path) -> None:
        data = json.loads((run / "results.json").read_text())
        change(data)
        (run / "results.json").write_text(json.dumps(data))

    return mutate


def _first_problem(data):
    return next(iter(data["problems"].values()))


DAMAGE = {
    "missing key": (_edit(lambda d: d.pop("run_id")), "missing 'run_id'"),
    "problems of the wrong type": (
        _edit(lambda d: d.__setitem__("problems", [1, 2])),
        "problems: expected an object",
    ),
    "another schema version": (
        _edit(lambda d: d.__setitem__("schema_version", 3)),
        "results schema version 3 cannot be read",
    ),
    "an unknown key": (
        _edit(lambda d: d.__setitem__("injected", 1)),
        "does not match the results schema",
    ),
    "arrays outside the run": (
        _edit(lambda d: _first_problem(d).__setitem__("arrays_file", "../../elsewhere.npz")),
        "arrays_file: '../../elsewhere.npz' must match",
    ),
    "arrays at an absolute path": (
        _edit(lambda d: _first_problem(d).__setitem__("arrays_file", "/etc/passwd")),
        "must match",
    ),
    "missing arrays": (
        lambda run: shutil.rmtree(run / "arrays"),
        "arrays file 'arrays/tiny-logreg.npz' is missing",
    ),
    "corrupt arrays": (
        lambda run: (run / "arrays" / "tiny-logreg.npz").write_bytes(b"PK\x03\x04 damaged"),
        "is damaged: BadZipFile",
    ),
    "arrays lacking a key": (
        lambda run: np.savez(run / "arrays" / "tiny-logreg.npz", removed_reason=np.array(["top"])),
        "lacks estimator/exact",
    ),
    "results.json not text": (
        lambda run: (run / "results.json").write_bytes(b"\xff\xfe{"),
        "cannot read",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_report_and_check_refuse_a_damaged_run_directory(damage, finished_run, tmp_path, capsys):
    run = tmp_path / "damaged"
    shutil.copytree(finished_run, run)
    mutate, message = DAMAGE[damage]
    mutate(run)
    before = snapshot(tmp_path)
    refused(capsys, cli(["report", run]), message)
    refused(capsys, cli(["check", run, "--baseline", finished_run]), message)
    refused(capsys, cli(["check", finished_run, "--baseline", run]), message)
    assert snapshot(tmp_path) == before


def test_check_with_nothing_to_compare_is_bad_input_not_a_regression(
    finished_run, tmp_path, capsys
):
    refused(
        capsys,
        cli(["check", finished_run, "--baseline", finished_run, "--metric", "nope"]),
        "unknown metric(s) nope",
    )
    empty = tmp_path / "empty"
    shutil.copytree(finished_run, empty)
    _edit(lambda d: _first_problem(d).__setitem__("metrics", {}))(empty)
    code = cli(["check", finished_run, "--baseline", empty])
    refused(capsys, code, "holds no defined pearson, spearman to compare with")
    # The other way round a metric vanished from the run: that is a regression (exit 1).
    assert cli(["check", empty, "--baseline", finished_run]) == 1
    assert "FAIL missing" in capsys.readouterr().out


def test_the_report_of_a_run_without_metrics_renders(finished_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    shutil.copytree(finished_run, empty)
    _edit(lambda d: _first_problem(d).__setitem__("metrics", {}))(empty)
    assert cli(["report", empty]) == 0
    assert "tiny-logreg" in (empty / "report.md").read_text()


def test_a_symlinked_arrays_file_pointing_outside_is_refused(finished_run, tmp_path, capsys):
    run = tmp_path / "linked"
    shutil.copytree(finished_run, run)
    outside = tmp_path / "outside.npz"
    shutil.move(run / "arrays" / "tiny-logreg.npz", outside)
    (run / "arrays" / "tiny-logreg.npz").symlink_to(outside)
    refused(capsys, cli(["report", run]), "lies outside the run directory")


def test_report_into_a_read_only_run_directory_is_one_line(
    finished_run, tmp_path, capsys, monkeypatch
):
    # Root writes anywhere, so read-only is simulated where the probe writes.
    import fidelity.core.locations as locations

    run = tmp_path / "readonly"
    shutil.copytree(finished_run, run)
    before = snapshot(tmp_path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(locations.tempfile, "mkstemp", denied)
    refused(capsys, cli(["report", run]), "run directory")
    assert snapshot(tmp_path) == before
