"""The command line: end to end on a small suite, and every bad input as a one-line error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fidelity.cli import main
from fidelity.core.cache import ArtifactCache
from fidelity.core.errors import FidelityError
from fidelity.retrain import Execution

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
    assert results["schema_version"] == 2
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
    report = (out / "report.md").read_text()
    interval = f"{pearson['value']:.4f} [{pearson['low']:.4f}, {pearson['high']:.4f}]"
    # The first screen: the problem's estimator x response matrix, the best starred.
    first = report.index("### diabetes-ridge: pearson against each response")
    assert first < report.index("## diabetes-ridge")
    starred = interval.replace(".", "\\.", 1).replace("[", "\\[").replace("]", "\\]")
    assert f"| exact | {starred} \u2605 |" in report
    assert report.count(f"| exact | cold | {interval} |") == 1  # and the problem's own table
    page = (out / "report.html").read_text()
    assert page.count(f'<td>cold</td><td class="num">{interval}') == 1
    assert f"<td>{interval} \u2605</td>" in page
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
    assert "is not a directory" in capsys.readouterr().err
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
            "--history",
            str(tmp_path / "fidelity.db"),
        ]
    )
    assert code == 0
    result = json.loads((out / "explain.json").read_text())
    made = result["provenance"]
    assert made["fidelity_version"] and "git_revision" in made and made["created"]
    assert made["environment"]["packages"]["torch"]
    assert made["command"][:3] == ["fidelity", "explain", "cancer-logreg"]
    from fidelity.history import recorded_applications

    (recorded,) = recorded_applications(tmp_path / "fidelity.db")
    assert recorded.application == "explain" and recorded.problem == "cancer-logreg"
    assert recorded.result == result and recorded.out_dir == str(out.resolve())
    capsys.readouterr()
    assert main(["history", "--applications", "--history", str(tmp_path / "fidelity.db")]) == 0
    assert "1 application output(s)" in capsys.readouterr().out
    assert set(result["estimators"]) == {"exact", "cg[tol=1e-10]"}
    assert result["loo"] == "shown"  # convex problem: actual deltas of the points shown
    assert all(row["actual"] is not None for row in result["estimators"]["exact"]["helpful"])
    assert result["overlap"]["helpful"]["exact"]["cg[tol=1e-10]"] == 1.0
    assert "## Explanation on cancer-logreg" in (out / "explain.md").read_text()
    assert (
        main(
            [
                "explain",
                "cancer-logreg",
                "--test",
                "2",
                "--out",
                str(tmp_path / "again"),
                "--cache-dir",
                str(tmp_path / "cache"),
                "--no-history",
                "-q",
            ]
        )
        == 0
    )
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


def test_cache_dir_reaches_problem_factories_as_an_argument(tmp_path, monkeypatch):
    seen = []

    def spy(spec, *, cache):
        seen.append(cache.root)
        raise FidelityError("stop after the problem")

    monkeypatch.setenv("FIDELITY_CACHE_DIR", "/elsewhere")
    monkeypatch.setattr("fidelity.cli.load_problem", spy)
    assert main(["prefilter", "tiny", "--cache-dir", str(tmp_path)]) == 2
    assert main(["prefilter", "tiny", "--no-cache"]) == 2
    assert seen == [tmp_path, None]
    assert os.environ["FIDELITY_CACHE_DIR"] == "/elsewhere"  # never set by the CLI


@pytest.fixture(scope="module")
def recorded_runs(tmp_path_factory):
    """Two runs of the small suite recorded in one history (the second reuses the cache)."""
    root = tmp_path_factory.mktemp("recorded")
    suite = root / "small.toml"
    suite.write_text(SMALL)
    history = root / "fidelity.db"
    runs = []
    for name in ("first", "second"):
        out = root / name
        code = run_cli(
            "run", suite, "--out", out, "--cache-dir", root / "cache", "--history", history
        )
        assert code == 0
        runs.append(out)
    return runs, history


def test_runs_are_recorded_and_history_prints_the_trend(recorded_runs, capsys):
    (_, second), history = recorded_runs
    capsys.readouterr()
    assert run_cli("history", "--history", history, "--suite", "small", "--metric", "spearman") == 0
    printed = capsys.readouterr().out
    assert "2 run(s), oldest first, metric spearman" in printed
    value = json.loads((second / "results.json").read_text())["problems"]["cancer-logreg"][
        "metrics"
    ]["exact"]["cold"]["spearman"]["value"]
    assert f"small cancer-logreg exact vs cold: {value:.4f} {value:.4f}  change +0.0000" in printed
    assert run_cli("history", "--history", history, "--problem", "nope") == 0
    assert "no 'pearson' recorded" in capsys.readouterr().out


def test_the_second_run_s_html_shows_the_trend(recorded_runs):
    (first, second), _ = recorded_runs
    assert "Trend of pooled pearson" not in (first / "report.html").read_text()
    page = (second / "report.html").read_text()
    assert "<h2>Trends</h2>" in page and "this run" in page
    assert (second / "figures" / "trends.png").is_file()


def test_check_passes_on_an_identical_baseline_and_fails_on_a_doctored_one(
    recorded_runs, tmp_path, capsys
):
    (first, second), history = recorded_runs
    assert run_cli("check", second, "--baseline", first) == 0
    assert "fidelity check passed" in capsys.readouterr().out
    doctored = json.loads((first / "results.json").read_text())
    entry = doctored["problems"]["diabetes-ridge"]["metrics"]["exact"]["cold"]["pearson"]
    entry.update(value=entry["value"] + 0.5, low=entry["value"] + 0.4, high=entry["value"] + 0.6)
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    assert run_cli("check", second, "--baseline", tmp_path / "doctored.json") == 1
    printed = capsys.readouterr().out
    assert "FAIL regressed: diabetes-ridge exact vs cold pearson" in printed
    assert printed.count("FAIL") == 1 and "fidelity check failed" in printed
    # Against the history: the first run, never checked, passes as the first of its
    # configuration and becomes the baseline the second is compared with.
    assert run_cli("check", first, "--against-last", "--history", history) == 0
    assert "first run of this configuration" in capsys.readouterr().out
    assert run_cli("check", second, "--against-last", "--history", history) == 0
    assert "against run" in capsys.readouterr().out


def test_report_rerenders_a_run_directory(recorded_runs, tmp_path, capsys):
    (first, _), history = recorded_runs
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(first, copy)
    for name in ("report.md", "report.html"):
        (copy / name).unlink()
    assert run_cli("report", copy, "--history", history) == 0
    assert (copy / "report.md").read_text() == (first / "report.md").read_text()
    assert (copy / "report.html").is_file()
    assert run_cli("report", tmp_path / "missing") == 2
    assert "does not exist" in capsys.readouterr().err


def test_figures_from_given_runs_and_computed_koh_panels(recorded_runs, tmp_path):
    from fidelity.paper import PAPER_FIGURES, FigureContext

    suite = tmp_path / "ladder.toml"
    suite.write_text(LADDER)
    ladder_run = tmp_path / "ladder"
    assert run_cli("run", suite, "--out", ladder_run, "--no-cache", "--no-history") == 0
    out = tmp_path / "figures"
    assert run_cli("figures", "bae2022-decomposition", "--out", out, "--run", ladder_run) == 0
    assert run_cli("figures", "estimator-ladder", "--out", out, "--run", ladder_run) == 0
    results = json.loads((ladder_run / "results.json").read_text())
    problem = results["problems"]["cancer-logreg"]
    import csv

    with (out / "estimator-ladder.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["stage"] for r in rows if r["estimator"] == "exact"] == [
        "cold",
        "warm",
        "pbrf",
        "linear",
    ]
    for row in rows:
        expected = problem["metrics"][row["estimator"]][row["stage"]]["pearson"]["value"]
        assert float(row["pearson"]) == pytest.approx(expected)
    with (out / "bae2022-decomposition.csv").open() as handle:
        gaps = list(csv.DictReader(handle))
    assert [g["gap"] for g in gaps[:3]] == [
        "warm vs cold start",
        "proximity + non-convergence",
        "linearisation",
    ]
    assert len(gaps) == 3 + len(problem["decomposition"]["estimators"])
    first_run = recorded_runs[0][0]
    assert run_cli("figures", "estimator-ladder", "--out", out, "--run", first_run) == 2

    context = FigureContext(
        out=out,
        execution=Execution(cache=ArtifactCache(tmp_path / "cache")),
        problems=("tests.fidelity.user_problems:tiny",),
        settings={"top": 8},
    )
    written = PAPER_FIGURES.get("koh2017-fig2")(context)
    assert sorted(p.name for p in written) == [
        "koh2017-fig2.csv",
        "koh2017-fig2.pdf",
        "koh2017-fig2.png",
    ]
    with (out / "koh2017-fig2.csv").open() as handle:
        points = list(csv.DictReader(handle))
    assert len(points) == 8 and len({p["train_index"] for p in points}) == 8
    assert (out / "koh2017-fig2.pdf").read_bytes()[:4] == b"%PDF"
    for name in ("bae2022-decomposition", "estimator-ladder", "koh2017-fig2"):
        assert (out / f"{name}.png").stat().st_size > 10_000
