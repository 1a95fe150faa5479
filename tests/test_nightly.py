"""The gate with teeth and the one-command night, end to end on a tiny suite: a doctored drop
fails the paired gate where the unpaired rule let it pass, a persistent regression fails on
every later night, a changed configuration is refused, the README's recipe runs twice as
written, and a crash exits 3 with its traceback in the night's directory."""

import json
import re
import shlex
import shutil
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fidelity.cli import main
from fidelity.metrics import pearson, score

REPO = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
problems = ["cancer-logreg"]
[selection]
test_points = 10
random = 24
top = 6
[metrics]
bootstrap = 100
[[estimators]]
kind = "exact"
[[responses]]
kind = "cold"
"""


def run_cli(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """One recorded run of the tiny suite (the baseline the tests doctor copies of)."""
    root = tmp_path_factory.mktemp("night")
    (root / "tiny.toml").write_text(TINY)
    out = root / "base"
    history = root / "fidelity.db"
    code = run_cli(
        "run", root / "tiny.toml", "--out", out, "--cache-dir", root / "cache", "--history", history
    )
    assert code == 0
    return root, out, history


def copy_run(source: Path, target: Path, *, days: int = 1, predicted=None, suite_edit=None):
    """A copy of a run as if made ``days`` later (a new run id), optionally with the estimator's
    predictions replaced (results.json's metrics recomputed to match, as a real run would state
    them) or its suite edited."""
    shutil.copytree(source, target)
    document = json.loads((target / "results.json").read_text())
    document["run_id"] = uuid.uuid4().hex
    created = datetime.fromisoformat(document["created"]) + timedelta(days=days)
    document["created"] = created.isoformat(timespec="seconds")
    if suite_edit is not None:
        suite_edit(document["suite"])
    if predicted is not None:
        problem = document["problems"]["cancer-logreg"]
        path = target / problem["arrays_file"]
        with np.load(path) as stored:
            arrays = {name: stored[name] for name in stored.files}
        arrays["estimator/exact"] = predicted
        np.savez(path, **arrays)
        metrics = score(predicted, arrays["response/cold"], n_boot=100)
        problem["metrics"]["exact"]["cold"] = {k: vars(v) for k, v in metrics.items()}
    (target / "results.json").write_text(json.dumps(document))
    return target


def arrays_of(run_dir: Path):
    with np.load(run_dir / "arrays" / "cancer-logreg.npz") as stored:
        return stored["response/cold"], stored["estimator/exact"]


def noisy(actual, target, rng, base=None):
    """``base`` (or ``actual``) plus seeded noise scaled so that the pooled Pearson against
    ``actual`` is near ``target``."""
    start = actual if base is None else base
    noise = rng.normal(size=actual.shape) * actual.std()
    low, high = 0.0, 100.0
    for _ in range(80):  # bisect the noise scale: the correlation falls as it grows
        scale = (low + high) / 2
        low, high = (
            (scale, high) if pearson(start + scale * noise, actual) > target else (low, scale)
        )
    return start + scale * noise


def amplified(actual, predicted, target):
    """``actual + k (predicted - actual)`` with k > 1 bisected so that the pooled Pearson is
    near ``target``: the same errors, larger (a solver that became less accurate the same way,
    as one with fewer iterations does)."""
    low, high = 1.0, 10.0
    for _ in range(80):
        k = (low + high) / 2
        low, high = (
            (k, high) if pearson(actual + k * (predicted - actual), actual) > target else (low, k)
        )
    return actual + k * (predicted - actual)


def test_the_doctored_drop_fails_the_paired_gate(night, tmp_path, capsys):
    _, base_run, _ = night
    actual, _ = arrays_of(base_run)
    rng = np.random.default_rng(0)
    wide = noisy(actual, 0.77, rng)
    baseline = copy_run(base_run, tmp_path / "baseline", predicted=wide)
    entry = json.loads((baseline / "results.json").read_text())["problems"]["cancer-logreg"]
    stated = entry["metrics"]["exact"]["cold"]["pearson"]
    assert stated["value"] == pytest.approx(0.77, abs=0.01)
    assert stated["high"] - stated["low"] > 0.1  # the wide interval of few test points

    dropped = copy_run(base_run, tmp_path / "dropped", predicted=noisy(actual, 0.40, rng, wide))
    capsys.readouterr()
    assert run_cli("check", dropped, "--baseline", baseline, "--no-record") == 1
    printed = capsys.readouterr().out
    assert "FAIL regressed: cancer-logreg exact vs cold pearson" in printed
    assert "hard floor" in printed

    # A drop of 0.07 (the same errors, larger): inside the baseline's own interval and under the
    # floor, so the unpaired rule (a results.json alone as the baseline) passes it; paired on
    # the same points, the drop's interval excludes zero and it fails.
    slight = copy_run(base_run, tmp_path / "slight", predicted=amplified(actual, wide, 0.70))
    capsys.readouterr()
    assert run_cli("check", slight, "--baseline", baseline / "results.json") == 0
    assert "unpaired" in capsys.readouterr().out
    assert run_cli("check", slight, "--baseline", baseline, "--json") == 1
    verdict = json.loads(capsys.readouterr().out)
    failures = {f["metric"]: f for f in verdict["findings"] if f["status"] != "ok"}
    failure = failures["pearson"]
    assert failure["paired"] and failure["drop"]["low"] > 0 and failure["drop"]["value"] < 0.1
    assert verdict["passed"] is False and verdict["settings"]["floor"] == 0.1

    # Identical runs pass, every metric paired.
    same = copy_run(baseline, tmp_path / "same")
    assert run_cli("check", same, "--baseline", baseline, "--json") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["passed"] and all(f["paired"] for f in verdict["findings"])
    assert all(f["drop"]["value"] == 0 for f in verdict["findings"])


def test_an_edited_results_json_is_refused(night, tmp_path, capsys):
    _, base_run, _ = night
    edited = copy_run(base_run, tmp_path / "edited")
    document = json.loads((edited / "results.json").read_text())
    document["problems"]["cancer-logreg"]["metrics"]["exact"]["cold"]["pearson"]["value"] = 0.5
    (edited / "results.json").write_text(json.dumps(document))
    capsys.readouterr()
    assert run_cli("check", edited, "--baseline", base_run, "--no-record") == 2
    assert "edited or damaged" in capsys.readouterr().err


def test_a_persistent_regression_fails_every_night_and_never_becomes_the_baseline(
    night, tmp_path, capsys
):
    _, base_run, _ = night
    history = tmp_path / "fidelity.db"
    first = copy_run(base_run, tmp_path / "first", days=0)
    actual, exact = arrays_of(base_run)
    worse = noisy(actual, 0.6, np.random.default_rng(2), exact)
    nights = [first] + [
        copy_run(base_run, tmp_path / f"night{day}", days=day, predicted=worse) for day in (1, 2)
    ]
    verdicts = []
    for run_dir in nights:
        assert run_cli("record", run_dir, "--history", history) == 0
        capsys.readouterr()
        code = run_cli("check", run_dir, "--against-last", "--history", history, "--json")
        verdicts.append((code, json.loads(capsys.readouterr().out)))
    first_id = json.loads((first / "results.json").read_text())["run_id"]
    assert verdicts[0][0] == 0 and verdicts[0][1]["first"]
    for code, verdict in verdicts[1:]:
        assert code == 1 and verdict["baseline_run_id"] == first_id
    assert run_cli("history", "--history", history, "--json") == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [run["passed"] for run in runs] == [True, False, False]
    assert len({run["config_hash"] for run in runs}) == 1


def test_a_changed_configuration_is_refused_naming_the_change(night, tmp_path, capsys):
    _, base_run, _ = night
    history = tmp_path / "fidelity.db"

    def new_damping(suite):
        suite["estimators"][0]["damping"] = 0.001

    changed = copy_run(base_run, tmp_path / "changed", suite_edit=new_damping)
    capsys.readouterr()
    assert run_cli("check", changed, "--baseline", base_run, "--no-record") == 2
    error = capsys.readouterr().err
    assert (
        "suite.estimators[0].damping: added (0.001)" in error and "--accept-config-change" in error
    )
    assert run_cli("check", changed, "--baseline", base_run, "--accept-config-change") == 0

    first = copy_run(base_run, tmp_path / "first", days=0)
    for run_dir in (first, changed):
        assert run_cli("record", run_dir, "--history", history) == 0
    assert run_cli("check", first, "--against-last", "--history", history) == 0
    capsys.readouterr()
    assert run_cli("check", changed, "--against-last", "--history", history) == 2
    assert "differs from its last passing run" in capsys.readouterr().err
    args = ("check", changed, "--against-last", "--history", history, "--accept-config-change")
    assert run_cli(*args) == 0
    printed = capsys.readouterr().out
    assert "first run of this configuration" in printed and "accepted as a new baseline" in printed


def readme_recipe() -> list[str]:
    """The nightly recipe as README.md states it (the block after its marker)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- nightly-recipe -->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README.md lost its nightly recipe"
    (line,) = [line for line in block.group(1).splitlines() if line.strip()]
    return shlex.split(line)


def test_the_readme_nightly_recipe_runs_twice_as_written(night, tmp_path, monkeypatch, capsys):
    root, _, _ = night
    recipe = readme_recipe()
    assert recipe[:2] == ["fidelity", "nightly"]
    # As written, with the tiny suite in place of the bundled one (an hour on this machine).
    suite_position = 2
    arguments = [*recipe[1:suite_position], str(root / "tiny.toml"), *recipe[suite_position + 1 :]]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FIDELITY_CACHE_DIR", str(root / "cache"))
    monkeypatch.delenv("FIDELITY_HISTORY", raising=False)
    capsys.readouterr()
    assert main(arguments) == 0
    assert "first run of this configuration" in capsys.readouterr().out
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "fidelity check passed" in printed and "paired" in printed
    nights = sorted((tmp_path / "runs" / "tiny").iterdir())
    today = datetime.now().strftime("%Y-%m-%d")
    assert [night.name[:10] for night in nights] == [today, today] and len(nights) == 2
    verdicts = [json.loads((night / "verdict.json").read_text()) for night in nights]
    assert verdicts[0]["first"] and verdicts[1]["passed"] and not verdicts[1]["first"]
    assert verdicts[1]["baseline_run_id"] == verdicts[0]["run_id"]
    assert (tmp_path / "fidelity.db").is_file()


def test_a_crash_exits_3_with_one_line_and_the_traceback_in_the_night(
    night, tmp_path, monkeypatch, capsys
):
    root, _, _ = night
    import fidelity.runner

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(fidelity.runner, "score_all", broken)
    capsys.readouterr()
    code = run_cli(
        "nightly",
        root / "tiny.toml",
        "--root",
        tmp_path / "runs",
        "--history",
        tmp_path / "fidelity.db",
        "--cache-dir",
        root / "cache",
        "-q",
    )
    assert code == 3
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "internal error" in error[0] and "ZeroDivisionError" in error[0]
    (crash,) = (tmp_path / "runs" / "tiny").glob("*/fidelity-crash-*.txt")
    assert "a bug of ours" in crash.read_text() and crash.name in error[0]


def test_stage_lines_on_stderr_and_quiet(night, tmp_path, capsys):
    root, _, _ = night
    common = ("--cache-dir", root / "cache", "--no-history")
    assert run_cli("run", root / "tiny.toml", "--out", tmp_path / "a", *common) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any(re.search(r"cancer-logreg: trained \(\d+ parameters", line) for line in lines)
    assert any("cold cancer-logreg: 30 refits (30 from the cache)" in line for line in lines)
    assert all(line.startswith("fidelity: ") for line in lines)
    assert run_cli("run", root / "tiny.toml", "--out", tmp_path / "b", *common, "-q") == 0
    assert capsys.readouterr().err == ""


def test_list_prints_json(capsys):
    assert run_cli("list", "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert {"problems", "estimators", "responses", "suites"} <= set(document)
    assert "nightly" in document["suites"]
    assert any(entry["name"] == "exact" for entry in document["estimators"])
