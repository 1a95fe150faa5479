"""Run history: an embedded SQLite database that every run appends to.

One run is one transaction (the run row, every metric with its interval, every timing), so a
reader never sees half a run and concurrent writers never lose one: writers take SQLite's
write lock up front (``BEGIN IMMEDIATE``) and wait for each other up to ``timeout`` seconds.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fidelity.core.errors import FidelityError
from fidelity.core.locations import check_writable
from fidelity.results import (
    Interval,
    RunResults,
    configuration_hash,
    configuration_of,
)

DEFAULT_HISTORY = "fidelity.db"
SQLITE_HEADER = b"SQLite format 3\x00"
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    created TEXT NOT NULL,
    git_revision TEXT,
    fidelity_version TEXT,
    run_dir TEXT,
    total_seconds REAL,
    results TEXT NOT NULL,
    config_hash TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_suite ON runs (suite, created);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    problem TEXT NOT NULL,
    estimator TEXT NOT NULL,
    response TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    low REAL,
    high REAL,
    PRIMARY KEY (run_id, problem, estimator, response, metric)
);
CREATE TABLE IF NOT EXISTS timings (
    run_id TEXT NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    problem TEXT NOT NULL,
    step TEXT NOT NULL,
    seconds REAL,
    PRIMARY KEY (run_id, problem, step)
);
"""

#: Tables of version 2: verdicts record what checks decided, applications the outputs of
#: explain, poison, mislabel and prefilter.
_SINCE_VERSION_2 = """
CREATE TABLE IF NOT EXISTS verdicts (
    run_id TEXT PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
    passed INTEGER NOT NULL,
    baseline_run_id TEXT,
    checked TEXT NOT NULL,
    summary TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS applications (
    output_id TEXT PRIMARY KEY,
    application TEXT NOT NULL,
    problem TEXT NOT NULL,
    created TEXT NOT NULL,
    git_revision TEXT,
    fidelity_version TEXT,
    out_dir TEXT,
    result TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS applications_by_kind ON applications (application, created);
"""
_SCHEMA += _SINCE_VERSION_2

#: Version 1 -> 2: runs carry their configuration hash, and the version-2 tables.
_UPGRADE_FROM_1 = "ALTER TABLE runs ADD COLUMN config_hash TEXT;" + _SINCE_VERSION_2


def default_history_path() -> Path:
    """``$FIDELITY_HISTORY`` if set, else ``fidelity.db`` in the working directory."""
    return Path(os.environ.get("FIDELITY_HISTORY") or DEFAULT_HISTORY)


@contextmanager
def connect(path: Path, *, timeout: float = 60.0) -> Iterator[sqlite3.Connection]:
    """An open connection to the history at ``path`` with the schema in place."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise FidelityError(f"history database {str(path)!r} is not a file")
    # SQLite takes a file shorter than its header for an empty database and overwrites it:
    # a file that is not one already must be refused before SQLite sees it.
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as stream:
            header = stream.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise FidelityError(
                f"{str(path)!r} is not a fidelity history database (not an SQLite file); use "
                "another --history path"
            )
    if path.parent != Path() and not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        connection = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise FidelityError(f"cannot open history database {str(path)!r}: {exc}") from exc
    with closing(connection):
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise FidelityError(
                    f"history database {str(path)!r} has schema version {version}; this "
                    f"fidelity writes version {SCHEMA_VERSION}: use another --history path"
                )
            if version == 0:
                with _transaction(connection):
                    connection.executescript(
                        "BEGIN IMMEDIATE;"
                        + _SCHEMA
                        + f"PRAGMA user_version = {SCHEMA_VERSION};COMMIT;"
                    )
            elif version == 1:
                _upgrade_from_1(connection)
            else:
                _complete_tables(connection)
        except sqlite3.OperationalError:
            raise  # locked or busy: the caller waits or says so
        except sqlite3.DatabaseError as exc:
            raise FidelityError(f"{str(path)!r} is not a fidelity history database: {exc}") from exc
        yield connection


#: Every table of the current schema.
TABLES = ("runs", "metrics", "timings", "verdicts", "applications")


def _complete_tables(connection: sqlite3.Connection) -> None:
    """Create a table of the current schema that a history lacks (one made by an earlier
    development version of schema 2, or with a table dropped by hand); a history with every
    table is only read."""
    found = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    if set(TABLES) <= found:
        return
    with _transaction(connection):
        connection.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                connection.execute(statement)
        connection.execute("COMMIT")


def _upgrade_from_1(connection: sqlite3.Connection) -> None:
    """Add the configuration hashes (computed from each stored results document) and the
    verdicts table to a version-1 history, in one transaction."""
    with _transaction(connection):
        connection.execute("BEGIN IMMEDIATE")
        if connection.execute("PRAGMA user_version").fetchone()[0] == 1:  # not raced
            # One statement at a time: executescript would commit the open transaction.
            for statement in _UPGRADE_FROM_1.split(";"):
                if statement.strip():
                    connection.execute(statement)
            rows = connection.execute("SELECT run_id, results FROM runs").fetchall()
            for run_id, document in rows:
                connection.execute(
                    "UPDATE runs SET config_hash = ? WHERE run_id = ?",
                    (_document_hash(document), run_id),
                )
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")


def _document_hash(document: str) -> str | None:
    try:
        data = json.loads(document)
        fingerprints = {name: p["fingerprint"] for name, p in data["problems"].items()}
        return configuration_hash(configuration_of(data["suite"], fingerprints))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a document this version cannot read: never a baseline


@contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def metric_rows(results: RunResults) -> Iterator[tuple[str, str, str, str, Interval]]:
    """(problem, estimator, response, metric, interval) for every metric of a run."""
    for problem_name, by_estimator in results.metric_table().items():
        for estimator, by_response in by_estimator.items():
            for response, metrics in by_response.items():
                for metric, entry in metrics.items():
                    yield problem_name, estimator, response, metric, entry


def timing_rows(results: RunResults) -> Iterator[tuple[str, str, float]]:
    """(problem, step, seconds) for the training, each estimator and each response of a run."""
    for problem_name, problem in results.problems.items():
        for step, seconds in problem.timings.items():
            yield problem_name, step, seconds
        for label, info in problem.estimators.items():
            yield problem_name, f"estimator/{label}", info.fit_seconds + info.scores_seconds
        for label, response in problem.responses.items():
            yield problem_name, f"response/{label}", response.seconds


#: Seconds a run waits in all for a history that another process keeps locked.
WAIT_VARIABLE = "FIDELITY_HISTORY_WAIT"
DEFAULT_WAIT = 120.0


def history_wait() -> float:
    """``$FIDELITY_HISTORY_WAIT`` seconds, else ``DEFAULT_WAIT``."""
    text = os.environ.get(WAIT_VARIABLE)
    if text is None:
        return DEFAULT_WAIT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise FidelityError(f"${WAIT_VARIABLE} must be a number of seconds >= 0, got {text!r}")
    return value


def check_history(path: Path) -> None:
    """Refuse, before a run computes anything, a history it could not record in: a directory,
    an unwritable location, a file that is not a fidelity history."""
    check_writable(path, "run history", directory=False)
    if Path(path).is_file():
        try:
            with connect(path):
                pass
        except sqlite3.Error as exc:
            raise FidelityError(f"cannot open history database {str(path)!r}: {exc}") from None


def append_run(
    path: Path, results: RunResults, run_dir: Path | None = None, *, wait: float | None = None
) -> None:
    """Record one run in a single transaction.

    A history that another process keeps locked is retried with growing pauses for up to
    ``wait`` seconds in all (default ``history_wait()``), then refused in one line. A run already
    recorded (same ``run_id``) is refused rather than duplicated.
    """
    _retrying(path, lambda timeout: _append_run(path, results, run_dir, timeout=timeout), wait)


def record_verdict(
    path: Path,
    run_id: str,
    *,
    passed: bool,
    baseline_run_id: str | None,
    summary: str,
    wait: float | None = None,
) -> bool:
    """Store what a check decided about a recorded run (a recheck replaces the verdict);
    False when the run is not in the history (nothing stored)."""
    stored = []

    def write(timeout: float) -> None:
        with connect(path, timeout=timeout) as connection, _transaction(connection):
            connection.execute("BEGIN IMMEDIATE")
            known = connection.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if known:
                connection.execute(
                    "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?)",
                    (run_id, int(passed), baseline_run_id, _now(), summary),
                )
            connection.execute("COMMIT")
            stored.append(bool(known))

    _retrying(path, write, wait)
    return stored[-1]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _retrying(path: Path, write: Callable[[float], None], wait: float | None) -> None:
    """``write(timeout)`` retried with growing pauses while another process keeps the history
    locked, for up to ``wait`` seconds in all (default ``history_wait()``), then refused in one
    line."""
    wait = history_wait() if wait is None else wait
    deadline = time.monotonic() + wait
    pause = 0.05
    while True:
        remaining = deadline - time.monotonic()
        try:
            write(max(min(5.0, remaining), 0.0))
            return
        except sqlite3.OperationalError as exc:
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or time.monotonic() + pause > deadline:
                reason = f"still locked by another process after {wait:g} s" if busy else exc
                raise FidelityError(f"history database {str(path)!r}: {reason}") from None
        except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
            raise  # a value the code should not have passed: a bug, not the user's file
        except sqlite3.DatabaseError as exc:  # a damaged or foreign database
            raise FidelityError(f"history database {str(path)!r}: {exc}") from None
        time.sleep(pause)
        pause = min(2 * pause, 2.0)


def _append_run(path: Path, results: RunResults, run_dir: Path | None, *, timeout: float) -> None:
    run_id = results.run_id
    with connect(path, timeout=timeout) as connection, _transaction(connection):
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    results.suite_name,
                    results.created,
                    results.git_revision,
                    results.fidelity_version,
                    None if run_dir is None else str(Path(run_dir).resolve()),
                    results.timings["total_seconds"],
                    json.dumps(results.to_json()),
                    results.configuration_hash(),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise FidelityError(f"run {run_id} is already in history {str(path)!r}") from exc
        connection.executemany(
            "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (run_id, p, e, r, m, entry.value, entry.low, entry.high)
                for p, e, r, m, entry in metric_rows(results)
            ],
        )
        connection.executemany(
            "INSERT INTO timings VALUES (?, ?, ?, ?)",
            [(run_id, p, step, seconds) for p, step, seconds in timing_rows(results)],
        )
        connection.execute("COMMIT")


@dataclass(frozen=True)
class HistoryRun:
    """One recorded run: its identity and the metrics it stored."""

    run_id: str
    suite: str
    created: str
    git_revision: str | None
    run_dir: str | None
    metrics: dict[tuple[str, str, str, str], Interval]
    config_hash: str | None = None
    #: what the latest check decided: True passed, False failed, None never checked
    passed: bool | None = None


def recent_runs(
    path: Path,
    *,
    suite: str | None = None,
    last: int | None = None,
    before: str | None = None,
    exclude: str | None = None,
    passed: bool | None = None,
) -> list[HistoryRun]:
    """Recorded runs, oldest first: of ``suite`` (all suites if None), created at or before
    ``before`` (an ISO time), without run ``exclude``, only those whose latest check passed
    when ``passed`` is True, the newest ``last`` of them."""
    path = Path(path)
    if not path.is_file():
        return []
    clauses: list[str] = []
    parameters: list[str | int] = []
    for clause, value in (
        ("suite = ?", suite),
        ("created <= ?", before),
        ("runs.run_id != ?", exclude),
        ("verdicts.passed = ?", None if passed is None else int(passed)),
    ):
        if value is not None:
            clauses.append(clause)
            parameters.append(value)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    limit = "" if last is None else f"LIMIT {int(last)}"
    try:
        return _read_runs(path, where, limit, parameters)
    except sqlite3.Error as exc:
        raise FidelityError(f"cannot read history database {str(path)!r}: {exc}") from None


def _read_runs(path: Path, where: str, limit: str, parameters: list[str | int]) -> list[HistoryRun]:
    with connect(path) as connection:
        runs = connection.execute(
            "SELECT runs.run_id, suite, created, git_revision, run_dir, config_hash, "
            "verdicts.passed FROM runs LEFT JOIN verdicts ON verdicts.run_id = runs.run_id "
            f"{where} ORDER BY created DESC, runs.rowid DESC {limit}",
            parameters,
        ).fetchall()
        found = []
        for run_id, run_suite, created, revision, run_dir, config, verdict in reversed(runs):
            rows = connection.execute(
                "SELECT problem, estimator, response, metric, value, low, high FROM metrics "
                "WHERE run_id = ?",
                (run_id,),
            ).fetchall()
            metrics = {(row[0], row[1], row[2], row[3]): Interval(*row[4:]) for row in rows}
            known = None if verdict is None else bool(verdict)
            found.append(
                HistoryRun(run_id, run_suite, created, revision, run_dir, metrics, config, known)
            )
    return found


def record_application(
    path: Path, document: dict, out_dir: Path | None = None, *, wait: float | None = None
) -> str:
    """Record an application's output (explain, poison, mislabel, prefilter: the JSON it
    wrote, with its provenance) and return its id."""
    output_id = uuid.uuid4().hex
    made = document.get("provenance", {})

    def write(timeout: float) -> None:
        with connect(path, timeout=timeout) as connection, _transaction(connection):
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(
                "INSERT INTO applications VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    output_id,
                    str(document["application"]),
                    str(document["problem"]),
                    str(made.get("created") or _now()),
                    made.get("git_revision"),
                    made.get("fidelity_version"),
                    None if out_dir is None else str(Path(out_dir).resolve()),
                    json.dumps(document),
                ),
            )
            connection.execute("COMMIT")

    _retrying(path, write, wait)
    return output_id


@dataclass(frozen=True)
class RecordedApplication:
    output_id: str
    application: str
    problem: str
    created: str
    git_revision: str | None
    out_dir: str | None
    result: dict


def recorded_applications(
    path: Path, *, application: str | None = None, last: int | None = None
) -> list[RecordedApplication]:
    """Recorded application outputs, oldest first (of one ``application`` where given)."""
    if not Path(path).is_file():
        return []
    where = "WHERE application = ?" if application else ""
    limit = "" if last is None else f"LIMIT {int(last)}"
    try:
        with connect(path) as connection:
            rows = connection.execute(
                "SELECT output_id, application, problem, created, git_revision, out_dir, result "
                f"FROM applications {where} ORDER BY created DESC, rowid DESC {limit}",
                [application] if application else [],
            ).fetchall()
    except sqlite3.Error as exc:
        raise FidelityError(f"cannot read history database {str(path)!r}: {exc}") from None
    return [
        RecordedApplication(
            output_id=row[0],
            application=row[1],
            problem=row[2],
            created=row[3],
            git_revision=row[4],
            out_dir=row[5],
            result=json.loads(row[6]),
        )
        for row in reversed(rows)
    ]


def recorded_results(path: Path, run_id: str) -> RunResults:
    """The full results a run recorded (the history keeps each run's results.json)."""
    try:
        with connect(path) as connection:
            row = connection.execute(
                "SELECT results FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
    except sqlite3.Error as exc:
        raise FidelityError(f"cannot read history database {str(path)!r}: {exc}") from None
    if row is None:
        raise FidelityError(f"run {run_id} is not in history {str(path)!r}")
    try:
        data = json.loads(row[0])
    except ValueError as exc:
        raise FidelityError(f"history {str(path)!r}: run {run_id} is damaged: {exc}") from None
    return RunResults.from_json(data, source=f"run {run_id} in history {path}")


def count_runs(path: Path) -> tuple[int, int]:
    """(runs, metric rows) recorded in the history at ``path``."""
    with connect(path) as connection:
        runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        metrics = connection.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
    return runs, metrics
