"""The command line: end to end on a small suite, and every bad input as a one-line error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fidelity.cli import main

REPO = Path(__file__).resolve().parents[1]

SMALL = """
name = "small"
problems = ["diabetes-ridge", "cancer-logreg"]
[selection]
test_points = 6
random = 8
top = 6
[metrics]
bootstrap = 50
[[estimators]]
kind = "exact"
[[responses]]
kind = "cold"
"""


@pytest.fixture
def small_suite(tmp_path):
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return path


def run_cli(*args):
    return main([str(a) for a in args])


LADDER = """
name = "small-ladder"
problems = ["cancer-logreg"]
[selection]
test_points = 5
random = 6
top = 4
[metrics]
bootstrap = 50
[[estimators]]
kind = "exact"
[[estimators]]
kind = "grad-cos"
[[responses]]
kind = "cold"
[[responses]]
kind = "warm"
[[responses]]
kind = "pbrf"
[[responses]]
kind = "linear"
"""


def test_a_ladder_suite_reports_the_decomposition(tmp_path):
    suite = tmp_path / "ladder.toml"
    suite.write_text(LADDER)
    out = tmp_path / "run"
    assert run_cli("run", suite, "--out", out, "--no-cache") == 0
    results = json.loads((out / "results.json").read_text())
    decomposition = results["problems"]["cancer-logreg"]["decomposition"]
    assert decomposition["stages"] == ["cold", "warm", "pbrf", "linear"]
    assert [gap["components"] for gap in decomposition["gaps"]] == [
        ["warm vs cold start"],
        ["proximity", "non-convergence"],
        ["linearisation"],
    ]
    assert decomposition["estimators"]["exact"]["output_rms"] < 1e-10
    assert decomposition["estimators"]["grad-cos"]["output_rms"] is None
    report = (out / "report.md").read_text()
    assert "Gap decomposition" in report and "linearisation" in report
    assert (out / "figures" / "cancer-logreg-decomposition.png").stat().st_size > 0


def test_run_writes_a_complete_run_directory(small_suite, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", small_suite, "--out", out, "--cache-dir", tmp_path / "cache") == 0
    printed = capsys.readouterr().out
    assert "diabetes-ridge" in printed and "pearson" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["schema_version"] == 1
    assert results["suite"]["name"] == "small"
    assert results["environment"]["packages"]["torch"]
    assert set(results["problems"]) == {"diabetes-ridge", "cancer-logreg"}
    problem = results["problems"]["diabetes-ridge"]
    assert problem["n_removed"] == {"top": 6, "random": 8}
    pearson = problem["metrics"]["exact"]["cold"]["pearson"]
    assert pearson["low"] <= pearson["value"] <= pearson["high"]
    with np.load(out / "arrays" / "diabetes-ridge.npz") as arrays:
        assert arrays["estimator/exact"].shape == (6, 14)
        assert arrays["response/cold"].shape == (6, 14)
        assert len(set(arrays["removed_index"].tolist())) == 14
        assert list(arrays["removed_reason"][:6]) == ["top"] * 6
    assert (out / "report.md").read_text().count("| exact | cold |") == 2
    assert (out / "figures" / "cancer-logreg.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".run.partial-*"))


def test_problem_option_restricts_the_suite(small_suite, tmp_path):
    out = tmp_path / "run"
    assert (
        run_cli(
            "run",
            small_suite,
            "--problem",
            "tests.fidelity.user_problems:tiny",
            "--out",
            out,
            "--no-cache",
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert list(results["problems"]) == ["tiny-logreg"]


def test_second_run_reuses_the_cache(small_suite, tmp_path):
    cache = tmp_path / "cache"
    for name in ("first", "second"):
        assert run_cli("run", small_suite, "--out", tmp_path / name, "--cache-dir", cache) == 0
    first = json.loads((tmp_path / "first" / "results.json").read_text())["problems"]
    second = json.loads((tmp_path / "second" / "results.json").read_text())["problems"]
    for name in first:
        assert first[name]["responses"]["cold"]["info"]["cached"] == 0
        assert second[name]["responses"]["cold"]["info"]["refits"] == 0
        assert second[name]["training"]["cached"] is True
        assert first[name]["metrics"] == second[name]["metrics"]


def test_list_shows_every_registry(capsys):
    assert run_cli("list") == 0
    printed = capsys.readouterr().out
    for expected in ("digits-logreg", "exact", "cold", "smoke"):
        assert expected in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nosuchsuite"], "unknown suite 'nosuchsuite'"),
        (["run", "{suite}", "--problem", "nope"], "unknown problem 'nope'; valid names:"),
        (["run", "{suite}", "--problem", "missing_pkg.x:y"], "cannot import module"),
        (
            ["run", "{suite}", "--problem", "tests.fidelity.user_problems:with_nan"],
            "x_test holds 1 NaN",
        ),
        (["run", "{bad_toml}"], "malformed TOML"),
        (["run", "{bad_key}"], "unknown key(s) tset_points"),
        (["run", "{suite}", "--backend", "mpi"], "unknown joblib backend 'mpi'"),
        (["run", "{suite}", "--backend", "dask"], "dask backend needs a scheduler address"),
        (["run", "{suite}", "--scheduler", "tcp://127.0.0.1:1"], "only used by the dask backend"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    args, message, small_suite, tmp_path, capsys
):
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text(SMALL.replace('name = "small"', 'name = "small'))
    bad_key = tmp_path / "key.toml"
    bad_key.write_text(SMALL.replace("test_points", "tset_points"))
    out = tmp_path / "out"
    filled = [a.format(suite=small_suite, bad_toml=bad_toml, bad_key=bad_key) for a in args]
    assert run_cli(*filled, "--out", out, "--no-cache") == 2
    err = capsys.readouterr().err
    assert err.startswith("fidelity: error: ") and message in err
    assert err.count("\n") == 1
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_failure_in_a_later_problem_leaves_no_run_directory(small_suite, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_cli(
        "run",
        small_suite,
        "--problem",
        "diabetes-ridge",
        "--problem",
        "tests.fidelity.user_problems:broken",
        "--out",
        out,
        "--no-cache",
    )
    assert code == 2
    assert "failed to build" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_existing_output_directory_is_refused(small_suite, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli("run", small_suite, "--out", out, "--no-cache") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_console_script_prints_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fidelity.cli",
            "run",
            "smoke",
            "--problem",
            "nope",
            "--no-cache",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert completed.stderr.strip().startswith("fidelity: error: unknown problem 'nope'")


def test_multi_seed_cold_writes_per_seed_arrays_and_a_noise_ceiling(tmp_path):
    suite = tmp_path / "seeds.toml"
    suite.write_text(
        SMALL.replace(
            'problems = ["diabetes-ridge", "cancer-logreg"]',
            'problems = ["tests.fidelity.user_problems:tiny_network"]',
        )
        .replace('kind = "cold"', 'kind = "cold"\nseeds = 4')
        .replace('kind = "exact"', 'kind = "gnh"')
        .replace("test_points = 6", "test_points = 8")
    )
    out = tmp_path / "run"
    assert run_cli("run", suite, "--out", out, "--no-cache") == 0
    results = json.loads((out / "results.json").read_text())
    ceiling = results["problems"]["tiny-mlp-cross_entropy"]["responses"]["cold"]["noise_ceiling"]
    assert ceiling["seeds"] == 4 and -1 <= ceiling["pearson"] <= 1
    with np.load(out / "arrays" / "tiny-mlp-cross_entropy.npz") as arrays:
        per_seed = arrays["response/cold/seeds"]
        assert per_seed.shape == (4, 8, 14)
        np.testing.assert_allclose(arrays["response/cold"], per_seed.mean(0), atol=1e-15)
    assert "(4 seeds)" in (out / "report.md").read_text()


def test_unusable_output_or_cache_path_fails_before_any_work(small_suite, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert run_cli("run", small_suite, "--out", blocker / "run", "--no-cache") == 2
    assert "is a file" in capsys.readouterr().err
    assert run_cli("run", small_suite, "--out", tmp_path / "r", "--cache-dir", blocker) == 2
    assert "cache directory" in capsys.readouterr().err


def test_explain_command_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "explain"
    code = main(
        [
            "explain",
            "cancer-logreg",
            "--test",
            "2",
            "--top",
            "3",
            "--estimator",
            "exact",
            "--estimator",
            "cg[tol=1e-10]",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert code == 0
    result = json.loads((out / "explain.json").read_text())
    assert set(result["estimators"]) == {"exact", "cg[tol=1e-10]"}
    assert result["loo"] == "shown"  # convex problem: actual deltas of the points shown
    assert all(row["actual"] is not None for row in result["estimators"]["exact"]["helpful"])
    assert result["overlap"]["helpful"]["exact"]["cg[tol=1e-10]"] == 1.0
    assert "## Explanation on cancer-logreg" in (out / "explain.md").read_text()
    assert "most helpful" in capsys.readouterr().out


def test_application_input_errors_are_one_line(tmp_path, capsys):
    code = main(
        ["poison", "diabetes-ridge", "--budget", "3", "--no-cache", "--out", str(tmp_path / "p")]
    )
    assert code == 2
    assert "classification" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    with pytest.raises(SystemExit):
        main(["mislabel", "cancer-logreg", "--flip", "1.5"])
