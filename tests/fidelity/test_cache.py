"""The cache verifies what it reads: damaged, swapped or edited entries are reported in one line,
quarantined and recomputed, never used and never fatal."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from fidelity.core.cache import META, ArtifactCache, content_digest, writer_pid
from fidelity.retrain import Execution
from fidelity.runner import RunOptions, run_suite
from fidelity.suite import parse_suite

SUITE = {
    "name": "cache",
    "problems": ["cancer-logreg"],
    "selection": {"test_points": 5, "top": 4, "random": 4},
    "metrics": {"bootstrap": 50},
    "estimators": [{"kind": "exact"}],
    "responses": [{"kind": "cold"}],
}


def assert_same(found, expected):
    """Equal up to the float floor: the recomputed refits run in a smaller group than the clean
    run's, and a vmapped group's arithmetic rounds differently in the last bits."""
    assert set(found) == set(expected)
    for key, value in expected.items():
        if value.dtype.kind == "f":
            np.testing.assert_allclose(found[key], value, rtol=1e-12, atol=1e-15)
        else:
            np.testing.assert_array_equal(found[key], value)


def run(tmp_path, name, cache):
    options = RunOptions(out=tmp_path / name, execution=Execution(cache=cache), reports=False)
    results = run_suite(parse_suite(SUITE), options)
    (problem,) = results.problems.values()
    with np.load(tmp_path / name / problem.arrays_file) as arrays:
        return problem, {key: arrays[key] for key in arrays.files}


def test_entries_round_trip_and_carry_their_key_and_digest(tmp_path):
    cache = ArtifactCache(tmp_path)
    arrays = {"theta": np.arange(4.0), "iterations": np.int64(3)}
    cache.save("stage", "ab" * 32, arrays)
    loaded = cache.load("stage", "ab" * 32)
    assert set(loaded) == {"theta", "iterations"}
    np.testing.assert_array_equal(loaded["theta"], arrays["theta"])
    assert content_digest(loaded) == content_digest({k: np.asarray(v) for k, v in arrays.items()})
    with pytest.raises(ValueError, match="reserved"):
        cache.save("stage", "cd" * 32, {META: np.zeros(1)})


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "edited":  # a valid file whose theta was changed after it was written
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        arrays["theta"] = arrays["theta"] * (1 + 1e-6)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path.write_bytes(buffer.getvalue())
    elif how == "unverified":  # an entry without its record (an older fidelity's, say)
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files if name != META}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("truncated", "unreadable"),
        ("empty", "unreadable"),
        ("flipped", ""),
        ("directory", "unreadable"),
        ("edited", "do not match their digest"),
        ("unverified", "no verification record"),
    ],
)
def test_a_damaged_entry_is_quarantined_and_recomputed(tmp_path, capsys, how, reason):
    cache = ArtifactCache(tmp_path / "cache")
    _, clean = run(tmp_path, "clean", cache)
    entries = sorted(path for kind, _, path in cache.entries() if kind == "cold")
    victim = entries[0]
    damage(victim, how)
    capsys.readouterr()
    _, again = run(tmp_path, "again", cache)
    assert_same(again, clean)
    lines = [line for line in capsys.readouterr().err.splitlines() if "cache entry" in line]
    assert len(lines) == 1 and victim.name in lines[0] and "recomputing" in lines[0]
    assert reason in lines[0]
    assert len(cache.quarantined()) == 1
    assert victim.is_file() and all(check.problem is None for check in cache.verify())


def test_two_swapped_entries_are_both_detected(tmp_path, capsys):
    cache = ArtifactCache(tmp_path / "cache")
    problem, clean = run(tmp_path, "clean", cache)
    first, second = sorted(path for kind, _, path in cache.entries() if kind == "cold")[:2]
    first_bytes, second_bytes = first.read_bytes(), second.read_bytes()
    first.write_bytes(second_bytes)
    second.write_bytes(first_bytes)
    capsys.readouterr()
    found, again = run(tmp_path, "again", cache)
    assert_same(again, clean)
    pearson = found.metric("exact", "cold", "pearson").value
    assert pearson == pytest.approx(problem.metric("exact", "cold", "pearson").value, abs=1e-12)
    lines = [line for line in capsys.readouterr().err.splitlines() if "cache entry" in line]
    assert len(lines) == 2 and all("written for another entry" in line for line in lines)


def test_verify_lists_damage_without_touching_it_when_asked(tmp_path):
    cache = ArtifactCache(tmp_path)
    for number in range(3):
        cache.save("stage", f"{number:02d}" * 32, {"theta": np.full(3, float(number))})
    damage(next(cache.entries())[2], "empty")
    checks = cache.verify(quarantine=False)
    assert [check.problem is None for check in checks] == [False, True, True]
    assert not cache.quarantined()
    assert sum(check.problem is not None for check in cache.verify()) == 1
    assert len(cache.quarantined()) == 1 and len(cache.verify()) == 2


def dead_pid() -> int:
    """The PID of a process that has exited."""
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    folder = tmp_path / "stage" / "ab"
    folder.mkdir(parents=True)
    dead = dead_pid()
    stale = folder / f".{'ab' * 32}.npz.{dead}.x1y2.tmp"
    live = folder / f".{'ab' * 32}.npz.{os.getpid()}.x1y2.tmp"
    for path in (stale, live):
        path.write_bytes(b"partial")
    assert writer_pid(stale.name) == dead
    ArtifactCache(tmp_path)
    assert not stale.exists() and live.exists()


def test_a_killed_runs_staging_directory_is_removed_by_the_next_run(tmp_path):
    dead = dead_pid()
    staging = tmp_path / f".run.partial-{dead}"
    (staging / "arrays").mkdir(parents=True)
    run(tmp_path, "run", ArtifactCache(None))
    assert not staging.exists() and (tmp_path / "run" / "results.json").is_file()


def test_the_cache_command_reports_verifies_and_prunes(tmp_path, capsys):
    from fidelity.cli import main

    cache = ArtifactCache(tmp_path)
    for number in range(3):
        cache.save("stage", f"{number:02d}" * 32, {"theta": np.full(3, float(number))})
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    assert "stage" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 0
    assert "3 of 3 entries sound" in capsys.readouterr().out
    damage(next(cache.entries())[2], "flipped")
    assert main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "2 of 3 entries sound" in captured.out and "1 damaged" in captured.out
    assert len(captured.err.strip().splitlines()) == 1
    assert main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 1 quarantined" in capsys.readouterr().out and not cache.quarantined()
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "missing")]) == 2
