"""The run history: one transaction per run, concurrent writers lose nothing."""

import multiprocessing
import sqlite3

import pytest

from fidelity.core.errors import FidelityError
from fidelity.history import (
    append_run,
    connect,
    count_runs,
    metric_rows,
    recent_runs,
    record_verdict,
    recorded_results,
)
from fidelity.results import Interval
from tests.fakes import fake_results


def test_a_run_round_trips_with_intervals_and_timings(tmp_path):
    path = tmp_path / "h.db"
    results = fake_results(pearson=0.93)
    append_run(path, results, tmp_path / "run")
    (run,) = recent_runs(path)
    assert run.run_id == results.run_id and run.suite == "nightly"
    assert run.run_dir == str((tmp_path / "run").resolve())
    stored = run.metrics["digits-logreg", "exact", "pbrf", "pearson"]
    assert (stored.value, stored.low, stored.high) == pytest.approx((0.93, 0.88, 0.95))
    assert run.metrics["cancer-logreg", "cg", "cold", "spearman"] == Interval(0.8)
    assert len(run.metrics) == len(list(metric_rows(results))) == 12
    with connect(path) as connection:
        timings = dict(
            connection.execute(
                "SELECT step, seconds FROM timings WHERE problem = 'digits-logreg'"
            ).fetchall()
        )
    assert timings == {
        "train_seconds": 1.5,
        "total_seconds": 4.0,
        "estimator/exact": 0.75,
        "estimator/cg": 0.2,
        "response/cold": 2.0,
        "response/pbrf": 1.0,
    }


def test_selection_by_suite_time_exclusion_and_count(tmp_path):
    path = tmp_path / "h.db"
    for day, suite in ((1, "a"), (2, "b"), (3, "a"), (4, "a")):
        append_run(path, fake_results(suite, f"2026-12-0{day}T00:00:00+00:00", run_id=f"r{day}"))
    assert [r.run_id for r in recent_runs(path, suite="a")] == ["r1", "r3", "r4"]
    assert [r.run_id for r in recent_runs(path, suite="a", last=2)] == ["r3", "r4"]
    before = recent_runs(path, suite="a", before="2026-12-04T00:00:00+00:00", exclude="r4")
    assert [r.run_id for r in before] == ["r1", "r3"]
    assert recent_runs(tmp_path / "missing.db") == []


def test_a_run_is_recorded_once(tmp_path):
    path = tmp_path / "h.db"
    results = fake_results()
    append_run(path, results)
    with pytest.raises(FidelityError, match="already in history"):
        append_run(path, results)
    assert count_runs(path) == (1, 12)


def test_a_failing_run_leaves_nothing_behind(tmp_path):
    path = tmp_path / "h.db"
    results = fake_results()
    # a value sqlite cannot store fails the run's transaction after the first rows went in
    problem = results.problems["digits-logreg"]
    problem.timings["train_seconds"] = object()  # type: ignore[assignment]
    with pytest.raises(sqlite3.Error):
        append_run(path, results)
    assert count_runs(path) == (0, 0)


def test_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FidelityError, match="not a fidelity history"):
        append_run(junk, fake_results())
    newer = tmp_path / "newer.db"
    connection = sqlite3.connect(newer)
    connection.execute("PRAGMA user_version = 99")
    connection.close()
    with pytest.raises(FidelityError, match="schema version 99"):
        append_run(newer, fake_results())


def _append_many(path: str, writer: int, runs: int) -> None:
    for number in range(runs):
        append_run(path, fake_results(run_id=f"w{writer}-r{number}", pearson=0.5 + number / 100))


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = tmp_path / "h.db"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_append_many, args=(str(path), w, 20)) for w in range(8)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=300)
    assert [process.exitcode for process in writers] == [0] * 8
    assert count_runs(path) == (160, 160 * 12)
    ids = {run.run_id for run in recent_runs(path)}
    assert ids == {f"w{w}-r{n}" for w in range(8) for n in range(20)}


VERSION_1_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, suite TEXT NOT NULL, created TEXT NOT NULL,
    git_revision TEXT, fidelity_version TEXT, run_dir TEXT, total_seconds REAL,
    results TEXT NOT NULL);
CREATE TABLE metrics (run_id TEXT NOT NULL, problem TEXT NOT NULL, estimator TEXT NOT NULL,
    response TEXT NOT NULL, metric TEXT NOT NULL, value REAL, low REAL, high REAL,
    PRIMARY KEY (run_id, problem, estimator, response, metric));
CREATE TABLE timings (run_id TEXT NOT NULL, problem TEXT NOT NULL, step TEXT NOT NULL,
    seconds REAL, PRIMARY KEY (run_id, problem, step));
PRAGMA user_version = 1;
"""


def test_a_version_1_history_is_upgraded_with_configuration_hashes(tmp_path):
    import json

    path = tmp_path / "old.db"
    results = fake_results(pearson=0.9)
    old = sqlite3.connect(path)
    old.executescript(VERSION_1_SCHEMA)
    old.execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            results.run_id,
            "nightly",
            results.created,
            None,
            "0",
            None,
            1.0,
            json.dumps(results.to_json()),
        ),
    )
    old.execute(
        "INSERT INTO runs VALUES ('broken', 'nightly', '2020-01-01', NULL, '0', NULL, 1.0, '{')"
    )
    old.commit()
    old.close()
    runs = {run.run_id: run for run in recent_runs(path)}
    assert runs[results.run_id].config_hash == results.configuration_hash()
    assert runs["broken"].config_hash is None  # unreadable: never a baseline
    assert all(run.passed is None for run in runs.values())
    assert record_verdict(path, results.run_id, passed=True, baseline_run_id=None, summary="ok")
    assert not record_verdict(path, "unknown", passed=True, baseline_run_id=None, summary="ok")
    with connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 2


def test_verdicts_select_the_passing_runs_and_a_recheck_replaces_one(tmp_path):
    path = tmp_path / "h.db"
    for day in (1, 2, 3):
        append_run(path, fake_results("a", f"2026-12-0{day}T00:00:00+00:00", run_id=f"r{day}"))
    record_verdict(path, "r1", passed=True, baseline_run_id=None, summary="first")
    record_verdict(path, "r2", passed=False, baseline_run_id="r1", summary="failed")
    assert [run.run_id for run in recent_runs(path, passed=True)] == ["r1"]
    assert [run.passed for run in recent_runs(path)] == [True, False, None]
    record_verdict(path, "r2", passed=True, baseline_run_id="r1", summary="rechecked")
    assert [run.run_id for run in recent_runs(path, passed=True)] == ["r1", "r2"]
    assert recorded_results(path, "r3").run_id == "r3"
    with pytest.raises(FidelityError, match="not in history"):
        recorded_results(path, "r9")


def test_a_history_missing_a_table_gets_it_and_keeps_its_runs(tmp_path):
    path = tmp_path / "h.db"
    append_run(path, fake_results(run_id="kept"))
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE applications")
    raw.commit()
    raw.close()
    assert [run.run_id for run in recent_runs(path)] == ["kept"]
    from fidelity.history import record_application, recorded_applications

    record_application(path, {"application": "explain", "problem": "p", "provenance": {}})
    assert [entry.application for entry in recorded_applications(path)] == ["explain"]
