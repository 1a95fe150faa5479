"""The ``fidelity`` command line: ``run``, ``list``, ``report``, ``history``, ``check``,
``figures`` and the applications (``explain``, ``poison``, ``mislabel``, ``prefilter``,
``perturb``, ``attack``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import traceback
from datetime import datetime
from pathlib import Path

from fidelity import __version__, applications
from fidelity.applications.common import DEFAULT_ESTIMATORS
from fidelity.applications.explain import LooMode, check_explained_point
from fidelity.core import logs
from fidelity.core.cache import ArtifactCache, atomic_write_bytes, default_cache_dir
from fidelity.core.errors import FidelityError
from fidelity.core.locations import check_writable
from fidelity.core.problem import NewtonRecipe
from fidelity.environment import provenance
from fidelity.estimators import ESTIMATORS
from fidelity.gate import (
    DEFAULT_METRICS,
    GateSettings,
    Side,
    Verdict,
    configuration_changes,
    first_run,
    gate,
    metric_names,
)
from fidelity.history import (
    HistoryRun,
    append_run,
    check_history,
    default_history_path,
    recent_runs,
    record_application,
    record_verdict,
    recorded_applications,
    recorded_results,
)
from fidelity.paper import PAPER_FIGURES, FigureContext
from fidelity.problems import PROBLEMS, load_problem
from fidelity.reports import applications as render
from fidelity.reports import load_problem_arrays, write_reports
from fidelity.reports.markdown import md_escape, terminal_escape
from fidelity.reports.tables import summary_lines
from fidelity.results import RunResults
from fidelity.retrain import RESPONSES, Execution, read_ground_truth, train
from fidelity.runner import RunOptions, run_suite, safe_filename
from fidelity.suite import Suite, builtin_suites, load_suite


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class _Commands:
    """The subcommands, each given the common options (``-v``/``-q``)."""

    def __init__(self, commands, common: argparse.ArgumentParser) -> None:
        self._commands, self._common = commands, common

    def add_parser(self, name: str, **options) -> argparse.ArgumentParser:
        return self._commands.add_parser(name, parents=[self._common], **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fidelity", description="Validate influence estimators against retraining."
    )
    parser.add_argument("--version", action="version", version=f"fidelity {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    # Every command takes -v/-q (stage lines on stderr: -q warnings only, -v details).
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log lines (repeatable)"
    )
    verbosity.add_argument("-q", "--quiet", action="count", default=0, help="warnings only")
    commands = _Commands(subparsers, verbosity)

    run = commands.add_parser("run", help="run a suite and write a run directory")
    _add_run_options(run)

    score = commands.add_parser(
        "score",
        help="score a matrix of influence scores computed elsewhere against a suite's ground "
        "truth, written as a run",
    )
    _add_run_options(score)
    score.add_argument(
        "--scores",
        type=Path,
        metavar="FILE",
        help="the scores: .npy [n_test, n_train], or .npz/.safetensors with 'scores' and "
        "optionally 'test_index' and 'train_index'",
    )
    score.add_argument(
        "--sign",
        choices=("removal", "upweighting"),
        default="removal",
        help="removal: change of the test loss when the point is removed (ours, default); "
        "upweighting: d loss / d upweighting (converted by -1/N)",
    )
    score.add_argument("--label", default="scores", help="the scores' label in the results")
    score.add_argument("--key", default="scores", help="the array's name in .npz/.safetensors")
    score.add_argument(
        "--ground-truth",
        type=Path,
        metavar="FILE",
        help="subset retraining done elsewhere (.npz/.safetensors in TRAK's or dattri's "
        "layout, with test_index): every estimator gets an LDS against it, on its test points",
    )
    score.add_argument(
        "--layout",
        choices=("trak", "dattri"),
        default="trak",
        help="trak: masks [m, N] + margins [m, n]; dattri: indices [m, kept] + values [m, n] "
        "(dattri's negated target)",
    )
    score.add_argument(
        "--target",
        choices=("loss", "margin", "log-probability"),
        help="what the ground truth measured (default: margin for trak, loss for dattri)",
    )

    listing = commands.add_parser(
        "list", help="list problems, estimators, responses and bundled suites"
    )
    _add_json_option(listing)

    cache = commands.add_parser(
        "cache", help="inspect the artefact cache: info, verify every entry, prune quarantine"
    )
    cache.add_argument(
        "action",
        choices=("info", "verify", "prune"),
        help="info: entries and bytes per kind; verify: check every entry's key and digest, "
        "quarantine the damaged ones (exit 1 if any); prune: delete quarantined entries and "
        "dead writers' temporary files",
    )
    cache.add_argument(
        "--cache-dir",
        type=Path,
        help="the cache (default $FIDELITY_CACHE_DIR or ~/.cache/fidelity)",
    )

    report = commands.add_parser(
        "report", help="re-render report.md, report.html and figures of a run, without computing"
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _add_history_option(report)
    report.add_argument("--trend-runs", type=_positive_int, default=20, metavar="N")

    history = commands.add_parser("history", help="trends of recorded runs")
    history.add_argument("--suite", help="only runs of this suite")
    history.add_argument(
        "--metric", default="pearson", help="metric to show (pearson, spearman, kendall, ...)"
    )
    history.add_argument("--problem", help="only this problem")
    history.add_argument("--estimator", help="only this estimator label")
    history.add_argument("--response", help="only this response label")
    history.add_argument("--last", type=_positive_int, default=10, metavar="N", help="runs shown")
    history.add_argument(
        "--applications",
        action="store_true",
        help="list the recorded outputs of explain, poison, mislabel and prefilter instead",
    )
    _add_history_option(history)
    _add_json_option(history)

    check = commands.add_parser(
        "check",
        help="fail (exit 1) when a run's fidelity dropped against a baseline (paired bootstrap)",
    )
    check.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="run directory or results.json"
    )
    baseline = check.add_mutually_exclusive_group(required=True)
    baseline.add_argument(
        "--baseline", type=Path, metavar="RUN_DIR|results.json", help="a pinned run to compare with"
    )
    baseline.add_argument(
        "--against-last",
        action="store_true",
        help="compare with the newest earlier run of the same suite configuration whose check "
        "passed (from the run history); with none, the run passes as the first",
    )
    _add_gate_options(check)
    check.add_argument(
        "--no-record",
        action="store_true",
        help="do not store the verdict in the run history (stored when the run is recorded)",
    )
    _add_history_option(check)
    _add_json_option(check)

    nightly = commands.add_parser(
        "nightly",
        help="one night: run a suite into a dated directory, record it, check it against the "
        "last passing run of its configuration (exit 0 passed, 1 regressed, 2 bad input, 3 "
        "crash)",
    )
    _add_run_options(nightly, nightly=True)
    nightly.add_argument(
        "--root",
        type=Path,
        default=Path("runs"),
        help="where the nights go: ROOT/SUITE/YYYY-MM-DD (default runs)",
    )
    nightly.add_argument(
        "--baseline",
        type=Path,
        metavar="RUN_DIR",
        help="a pinned baseline instead of the last passing night",
    )
    _add_gate_options(nightly)
    _add_json_option(nightly)

    record = commands.add_parser(
        "record", help="record a finished run directory in the run history (after a failure)"
    )
    record.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _add_history_option(record)

    figures = commands.add_parser("figures", help="write a paper figure (PNG, PDF and CSV data)")
    figures.add_argument(
        "name",
        choices=PAPER_FIGURES.names(),
        metavar="NAME",
        help=f"one of {', '.join(PAPER_FIGURES.names())}",
    )
    figures.add_argument("--out", type=Path, default=Path("figures"), help="output directory")
    figures.add_argument(
        "--run",
        type=Path,
        action="append",
        metavar="RUN_DIR",
        help="take the data from these run directories instead of computing it "
        "(bae2022-decomposition, estimator-ladder); repeatable",
    )
    figures.add_argument("--cache-dir", type=Path, help="artefact cache")
    figures.add_argument("--no-cache", action="store_true", help="recompute everything")
    figures.add_argument("--workers", type=_positive_int, default=1, help="retraining processes")
    _add_applications(commands)
    return parser


def _add_run_options(command: argparse.ArgumentParser, *, nightly: bool = False) -> None:
    """The suite and the execution options of `run` (and of `score`, which is a run, and of
    `nightly`, which chooses its own directory and always records)."""
    command.add_argument("suite", help="bundled suite name (e.g. smoke) or path to a suite .toml")
    command.add_argument(
        "--problem",
        action="append",
        metavar="NAME",
        help="run only these problems (registry name or package.module:function); repeatable",
    )
    if not nightly:
        command.add_argument("--out", type=Path, help="run directory (default runs/<suite>-<time>)")
    command.add_argument("--workers", type=_positive_int, default=1, help="retraining processes")
    command.add_argument(
        "--backend",
        default="loky",
        help="joblib backend: loky (default), threading, sequential, or dask (needs --scheduler "
        "and the [dask] extra)",
    )
    command.add_argument(
        "--scheduler", metavar="ADDRESS", help="dask scheduler address, e.g. tcp://host:8786"
    )
    command.add_argument(
        "--cache-dir",
        type=Path,
        help="artefact cache (default $FIDELITY_CACHE_DIR or ~/.cache/fidelity)",
    )
    command.add_argument(
        "--no-cache", action="store_true", help="recompute everything, store nothing"
    )
    command.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_history_option(command)
    if not nightly:
        command.add_argument(
            "--no-history", action="store_true", help="do not record this run in the run history"
        )


def _add_gate_options(command: argparse.ArgumentParser) -> None:
    defaults = GateSettings()
    command.add_argument(
        "--tolerance",
        type=float,
        default=defaults.tolerance,
        help=f"drop tolerated (default {defaults.tolerance:g}); a larger drop fails when its "
        "paired bootstrap interval excludes zero",
    )
    command.add_argument(
        "--floor",
        type=float,
        default=defaults.floor,
        help=f"drop that fails whatever the intervals (default {defaults.floor:g})",
    )
    command.add_argument(
        "--metric",
        action="append",
        help=f"metrics compared, repeatable (default: {', '.join(defaults.metrics)})",
    )
    command.add_argument(
        "--bootstrap",
        type=int,
        default=defaults.bootstrap,
        help=f"paired bootstrap replicates (default {defaults.bootstrap})",
    )
    command.add_argument(
        "--accept-config-change",
        action="store_true",
        help="compare with a baseline of another suite configuration anyway (with "
        "--against-last or nightly: start a new baseline); refused otherwise",
    )


def _add_json_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--json", action="store_true", help="print one JSON document on stdout instead of text"
    )


def _add_history_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--history",
        type=Path,
        metavar="PATH",
        help="run history database (default $FIDELITY_HISTORY or ./fidelity.db)",
    )


APPLICATIONS = ("explain", "poison", "mislabel", "prefilter", "perturb", "attack", "damping")
# The perturbation commands follow one estimator; its inverse product is the expensive part.
PERTURBATION_ESTIMATOR = "gnh"


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _add_applications(commands) -> None:

    def common(
        name: str, help_text: str, *, one_estimator: bool = False
    ) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("problem", help="problem name, e.g. 'movies-minilm-logreg[size=2000]'")
        command.add_argument(
            "--estimator",
            action="append",
            metavar="SPEC",
            help=(
                "estimator as kind or kind[key=value,...], once; an inverse-curvature estimator "
                f"(default: {PERTURBATION_ESTIMATOR})"
                if one_estimator
                else "estimator as kind or kind[key=value,...], repeatable (default: "
                f"{', '.join(DEFAULT_ESTIMATORS)})"
            ),
        )
        command.add_argument(
            "--out", type=Path, help=f"output directory (default runs/{name}-<time>)"
        )
        command.add_argument(
            "--cache-dir", type=Path, help="artefact cache (trained models, encodings)"
        )
        command.add_argument("--no-cache", action="store_true", help="recompute everything")
        _add_history_option(command)
        command.add_argument(
            "--no-history", action="store_true", help="do not record the output in the history"
        )
        return command

    explain = common("explain", "most helpful and harmful training points for one test point")
    target = explain.add_mutually_exclusive_group(required=True)
    target.add_argument("--test", type=int, metavar="INDEX", help="index in the test split")
    target.add_argument("--text", help="a new sentence (text problems)")
    explain.add_argument("--label", type=int, help="label of --text (default: the prediction)")
    explain.add_argument("--top", type=_positive_int, default=10)
    explain.add_argument(
        "--loo",
        choices=("all", "shown", "none"),
        help="leave-one-out deltas for every training point, the ones shown, or none "
        "(default: shown for convex problems, none otherwise)",
    )
    poison = common("poison", "flip the labels of the most helpful training points, retrain")
    poison.add_argument("--budget", type=_positive_int, required=True, metavar="K")
    poison.add_argument("--seeds", type=_positive_int, default=3, help="training/random seeds")
    mislabel = common("mislabel", "find flipped labels by self-influence")
    mislabel.add_argument("--flip", type=_fraction, default=0.1, help="fraction of labels")
    mislabel.add_argument("--seeds", type=_positive_int, default=3)
    mislabel.add_argument(
        "--check",
        type=_fraction,
        action="append",
        help="fractions checked (default 0.05 0.1 0.2 0.3)",
    )
    prefilter = common("prefilter", "recall of influential sentences among retrieved candidates")
    prefilter.add_argument("--test-points", type=_positive_int, default=50)
    prefilter.add_argument("--top", type=_positive_int, default=10)
    perturb = common(
        "perturb",
        "perturbation influence against retraining with a moved input",
        one_estimator=True,
    )
    perturb.add_argument(
        "--test-points", type=_positive_int, default=10, help="test points drawn (default 10)"
    )
    perturb.add_argument(
        "--train-points",
        type=_positive_int,
        default=10,
        help="training points moved, drawn per test point (default 10)",
    )
    perturb.add_argument(
        "--eps",
        type=float,
        action="append",
        help="step sizes, repeatable (default 0.001 0.01 0.1 0.3 1)",
    )
    perturb.add_argument("--seed", type=int, default=0, help="draws of points and directions")
    attack = common(
        "attack",
        "move one training input per test point to flip its prediction",
        one_estimator=True,
    )
    attack.add_argument(
        "--test-points",
        type=_positive_int,
        default=20,
        help="correctly classified test points attacked (default 20)",
    )
    attack.add_argument(
        "--budget", type=float, default=0.1, help="L-infinity budget of the move (default 0.1)"
    )
    attack.add_argument(
        "--steps", type=_positive_int, default=10, help="signed-gradient steps (default 10)"
    )
    attack.add_argument("--seed", type=int, default=0, help="draws of test points and random moves")
    damping = commands.add_parser(
        "damping",
        help="sweep each damped estimator's damping, choose it on held-out subsets",
    )
    damping.add_argument("problem", help="problem name, e.g. 'digits-mlp'")
    damping.add_argument(
        "--estimator",
        action="append",
        metavar="SPEC",
        help="damped estimator as kind or kind[key=value,...], repeatable (default: "
        f"{', '.join(applications.damping.DEFAULT_DAMPED)})",
    )
    damping.add_argument(
        "--grid",
        type=float,
        action="append",
        help="damping values, repeatable (default "
        f"{' '.join(f'{g:g}' for g in applications.damping.DEFAULT_GRID)})",
    )
    damping.add_argument("--test-points", type=_positive_int, default=20, help="(default 20)")
    damping.add_argument(
        "--subsets",
        type=_positive_int,
        default=100,
        help="subsets per half: as many select as score (default 100)",
    )
    damping.add_argument(
        "--alpha", type=_fraction, default=0.5, help="fraction of the training set kept (0.5)"
    )
    damping.add_argument(
        "--seeds", type=_positive_int, default=1, help="training seeds per subset (default 1)"
    )
    damping.add_argument("--seed", type=int, default=0, help="draws of test points and subsets")
    damping.add_argument("--out", type=Path, help="output directory (default runs/damping-<time>)")
    damping.add_argument(
        "--cache-dir", type=Path, help="artefact cache (trained models, encodings)"
    )
    damping.add_argument("--no-cache", action="store_true", help="recompute everything")
    _add_history_option(damping)
    damping.add_argument(
        "--no-history", action="store_true", help="do not record the output in the history"
    )
    attack.add_argument(
        "--range",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        help="valid input values (default: the training inputs' smallest and largest)",
    )


def _cache(args: argparse.Namespace) -> ArtifactCache:
    """The artefact cache the command's options name (disabled by --no-cache)."""
    if getattr(args, "no_cache", False):
        return ArtifactCache(None)
    return ArtifactCache(getattr(args, "cache_dir", None) or default_cache_dir())


def command_cache(args: argparse.Namespace) -> int:
    root = Path(args.cache_dir or default_cache_dir())
    if not root.is_dir():
        raise FidelityError(f"cache directory {str(root)!r} does not exist")
    cache = ArtifactCache(root)
    if args.action == "prune":
        removed = cache.quarantined()
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        print(f"removed {len(removed)} quarantined entries from {root}")
        return 0
    if args.action == "verify":
        checks = cache.verify()
        damaged = [check for check in checks if check.problem is not None]
        print(
            f"{len(checks) - len(damaged)} of {len(checks)} entries sound in {root}; "
            f"{len(damaged)} damaged (quarantined)"
        )
        return 1 if damaged else 0
    sizes: dict[str, list[int]] = {}
    for kind, _, path in cache.entries():
        sizes.setdefault(kind, []).append(path.stat().st_size if path.is_file() else 0)
    print(f"cache {root}")
    for kind, found in sorted(sizes.items()):
        print(f"  {terminal_escape(kind):<28} {len(found):>7} entries {sum(found):>14,} bytes")
    print(f"  quarantined: {len(cache.quarantined())}")
    return 0


def command_run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    if args.problem:
        suite = suite.with_problems(tuple(args.problem))
    return _run(suite, args)


def command_score(args: argparse.Namespace) -> int:
    """A run of the suite with the score file as one more estimator: the ground truth comes from
    (and goes to) the cache like any run's, and the results, report and history rows are a
    run's."""
    suite = load_suite(args.suite)
    if args.problem:
        suite = suite.with_problems(tuple(args.problem))
    if len(suite.problems) != 1:
        raise FidelityError(
            f"a score file is for one problem; suite {suite.name!r} runs "
            f"{', '.join(suite.problems)}: name one with --problem"
        )
    if args.scores is None and args.ground_truth is None:
        raise FidelityError("fidelity score needs --scores FILE, --ground-truth FILE or both")
    if args.scores is not None:
        settings = {"path": str(args.scores), "sign": args.sign, "key": args.key}
        suite = suite.with_estimator("scores", args.label, settings)
    if args.ground_truth is not None:
        (problem,) = suite.problems
        loaded = load_problem(problem, cache=_cache(args))
        found = read_ground_truth(args.ground_truth, args.layout, loaded.n_train, loaded.n_test)
        settings = {"path": str(args.ground_truth), "layout": args.layout}
        if args.target is not None:
            settings["target"] = args.target
        suite = suite.with_subsets("imported", "imported", settings)
        suite = suite.with_test_index(problem, tuple(found.test_index.tolist()))
    return _run(suite, args)


def _run(suite: Suite, args: argparse.Namespace, *, quiet: bool = False) -> int:
    """Run ``suite`` as the options say and print its summary (on stderr when ``quiet``, so that
    stdout can carry one JSON document)."""
    summary = sys.stderr if quiet else sys.stdout
    out = args.out or Path("runs") / f"{suite.name}-{datetime.now():%Y%m%d-%H%M%S}"
    execution = Execution(
        cache=_cache(args),
        workers=args.workers,
        backend=args.backend,
        progress=not args.no_progress and sys.stderr.isatty(),
        scheduler=args.scheduler,
    )
    options = RunOptions(
        out=out,
        execution=execution,
        history=None if args.no_history else (args.history or default_history_path()),
    )
    results = run_suite(suite, options)
    for line in summary_lines(results):
        print(terminal_escape(line), file=summary)
    for name, problem in results.problems.items():
        for estimator, response in problem.undefined_pairs():
            warning = (
                f"fidelity: warning: {name} {estimator} vs {response}: correlations "
                "undefined (constant or overflowing values)"
            )
            print(terminal_escape(warning), file=sys.stderr)
    print(f"wrote {out} in {results.timings['total_seconds']:.1f} s", file=summary)
    return 0


def command_list(args: argparse.Namespace) -> int:
    registries = (("problems", PROBLEMS), ("estimators", ESTIMATORS), ("responses", RESPONSES))
    if args.json:
        document: dict[str, object] = {
            title: [{"name": n, "description": registry.description(n)} for n in registry.names()]
            for title, registry in registries
        }
        document["suites"] = list(builtin_suites())
        print(json.dumps(document, indent=2))
        return 0
    for title, registry in registries:
        print(f"{title}:")
        for name in registry.names():
            print(f"  {name:<18} {registry.description(name)}")
    print("suites:")
    for name in builtin_suites():
        print(f"  {name}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    if not args.run_dir.is_dir():
        raise FidelityError(f"run directory {str(args.run_dir)!r} does not exist")
    results = RunResults.load(args.run_dir)
    check_writable(args.run_dir, "run directory", directory=True)
    history = recent_runs(
        args.history or default_history_path(),
        suite=results.suite_name,
        before=results.created,
        exclude=results.run_id,
        last=args.trend_runs - 1,
    )
    written = write_reports(args.run_dir, results, history=history)
    for path in written.values():
        print(f"wrote {path}")
    return 0


def command_history(args: argparse.Namespace) -> int:
    path = args.history or default_history_path()
    if not path.is_file():
        raise FidelityError(f"no run history at {str(path)!r} (runs record there by default)")
    if args.applications:
        return _print_applications(path, args)
    runs = recent_runs(path, suite=args.suite, last=args.last)
    if not runs and not args.json:
        print(f"no runs recorded{f' for suite {args.suite!r}' if args.suite else ''} in {path}")
        return 0
    wanted = {"problem": args.problem, "estimator": args.estimator, "response": args.response}
    series: dict[tuple[str, str, str, str], list[float | None]] = {}
    for position, run in enumerate(runs):
        for key, entry in run.metrics.items():
            problem, estimator, response, metric = key
            named = {"problem": problem, "estimator": estimator, "response": response}
            if metric != args.metric or any(v and named[k] != v for k, v in wanted.items()):
                continue
            series.setdefault((run.suite, *key[:3]), [None] * len(runs))[position] = entry.value
    if args.json:
        document = {
            "history": str(path),
            "metric": args.metric,
            "runs": [
                {
                    "run_id": run.run_id,
                    "suite": run.suite,
                    "created": run.created,
                    "git_revision": run.git_revision,
                    "run_dir": run.run_dir,
                    "config_hash": run.config_hash,
                    "passed": run.passed,
                }
                for run in runs
            ],
            "series": [
                {"suite": s, "problem": p, "estimator": e, "response": r, "values": values}
                for (s, p, e, r), values in sorted(series.items())
            ],
        }
        print(json.dumps(document, indent=2))
        return 0
    print(f"{len(runs)} run(s), oldest first, metric {args.metric}:")
    for position, run in enumerate(runs, 1):
        revision = run.git_revision or "-"
        verdict = {True: "passed", False: "FAILED", None: "unchecked"}[run.passed]
        line = f"  [{position}] {run.created} {run.suite} {revision} {verdict} {run.run_dir or ''}"
        print(terminal_escape(line))
    if not series:
        print(f"no {args.metric!r} recorded for the selection")
        return 0
    for (suite, problem, estimator, response), values in sorted(series.items()):
        cells = " ".join("   -  " if v is None else f"{v:.4f}" for v in values)
        known = [v for v in values if v is not None]
        change = f"  change {known[-1] - known[0]:+.4f}" if len(known) > 1 else ""
        print(terminal_escape(f"{suite} {problem} {estimator} vs {response}: {cells}{change}"))
    return 0


def _print_applications(path: Path, args: argparse.Namespace) -> int:
    found = recorded_applications(path, last=args.last)
    if args.json:
        print(json.dumps([vars(entry) for entry in found], indent=2))
        return 0
    print(f"{len(found)} application output(s), oldest first:")
    for entry in found:
        line = (
            f"  {entry.created} {entry.application} {entry.problem} "
            f"{entry.git_revision or '-'} {entry.out_dir or ''}"
        )
        print(terminal_escape(line))
    return 0


def _load_run(path: Path) -> RunResults:
    """A run's results, with its arrays checked too where ``path`` is a run directory (a
    results.json alone is a valid baseline)."""
    results = RunResults.load(path)
    if path.is_dir():
        for problem in results.problems.values():
            load_problem_arrays(path, problem)
    return results


def _gate_settings(args: argparse.Namespace) -> GateSettings:
    return GateSettings(
        tolerance=args.tolerance,
        floor=args.floor,
        metrics=tuple(args.metric or DEFAULT_METRICS),
        bootstrap=args.bootstrap,
    )


def _side(path: Path) -> Side:
    """A run given on the command line: a run directory (paired comparisons possible) or a
    results.json alone."""
    return Side(_load_run(path), path if path.is_dir() else None, str(path))


def _recorded_side(history: Path, run: HistoryRun) -> tuple[Side, str | None]:
    """A recorded run, paired through its run directory where that still holds the same run;
    else unpaired from the results the history keeps (with a note saying why)."""
    results = recorded_results(history, run.run_id)
    name = f"run {run.run_id} of {run.created} (history {history})"
    if run.run_dir is None or not Path(run.run_dir).is_dir():
        return Side(results, None, name), f"{name}: its run directory is gone"
    try:
        on_disk = _load_run(Path(run.run_dir))
    except FidelityError as exc:
        return Side(results, None, name), f"{name}: its run directory is unusable ({exc})"
    if on_disk.run_id != run.run_id:
        return Side(results, None, name), f"{name}: {run.run_dir} now holds another run"
    return Side(results, Path(run.run_dir), name), None


def _changes_text(changes: list[str], shown: int = 6) -> str:
    more = f"; and {len(changes) - shown} more" if len(changes) > shown else ""
    return "; ".join(changes[:shown]) + more


def decide(
    current: Side,
    settings: GateSettings,
    *,
    history: Path,
    pinned: Path | None,
    accept_config_change: bool,
) -> Verdict:
    """The gate's verdict on ``current``: against the pinned run, or else against the newest
    earlier run of the same suite configuration whose check passed (a first run of a
    configuration passes). A baseline of another configuration is refused (exit 2) naming
    what changed, unless ``accept_config_change``."""
    results = current.results
    known = metric_names(results.metric_table())
    notes: list[str] = []
    if pinned is not None:
        baseline = _side(pinned)
    else:
        passing = recent_runs(
            history,
            suite=results.suite_name,
            before=results.created,
            exclude=results.run_id,
            passed=True,
        )
        configuration = results.configuration_hash()
        same = [run for run in passing if run.config_hash == configuration]
        if not same:
            if passing:
                other = recorded_results(history, passing[-1].run_id)
                changes = configuration_changes(results, other)
                described = (
                    f"the configuration of suite {results.suite_name!r} differs from its last "
                    f"passing run {passing[-1].run_id} of {passing[-1].created}: "
                    f"{_changes_text(changes)}"
                )
                if not accept_config_change:
                    raise FidelityError(
                        f"{described}; pass --accept-config-change to start a new baseline"
                    )
                notes.append(f"{described}; accepted as a new baseline")
            _check_metrics(settings, known, current.name, None)
            return dataclasses.replace(first_run(settings), notes=tuple(notes))
        baseline, note = _recorded_side(history, same[-1])
        notes += [note] if note else []
    _check_metrics(
        settings, known | metric_names(baseline.results.metric_table()), current.name, baseline.name
    )
    changes = configuration_changes(results, baseline.results)
    if changes and not accept_config_change:
        raise FidelityError(
            f"{current.name} and the baseline {baseline.name} are runs of different "
            f"configurations: {_changes_text(changes)}; pass --accept-config-change to compare "
            "them anyway"
        )
    verdict = gate(current, baseline, settings)
    return dataclasses.replace(verdict, notes=(*notes, *verdict.notes))


def _check_metrics(
    settings: GateSettings, known: set[str], current: str, baseline: str | None
) -> None:
    where = current if baseline is None else f"{current} and the baseline {baseline}"
    if not known:
        raise FidelityError(f"{where}: no metric to compare")
    unknown = [metric for metric in settings.metrics if metric not in known]
    if unknown:
        raise FidelityError(
            f"unknown metric(s) {', '.join(unknown)}; {where} hold {', '.join(sorted(known))}"
        )


def _verdict_document(verdict: Verdict, current: Side) -> dict[str, object]:
    """The verdict as ``check --json`` prints it and ``nightly`` writes it."""
    return {"run": current.name, "run_id": current.results.run_id, **verdict.to_json()}


def _print_verdict(verdict: Verdict, current: Side, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(_verdict_document(verdict, current), indent=2))
        return
    settings = verdict.settings
    against = verdict.baseline or "no baseline (first run of this configuration)"
    print(
        terminal_escape(
            f"checked {len(verdict.findings)} metric(s) of {current.name} against {against} "
            f"(tolerance {settings.tolerance:g}, floor {settings.floor:g}, metrics "
            f"{', '.join(settings.metrics)}, configuration {current.results.configuration_hash()})"
        )
    )
    for note in verdict.notes:
        print(terminal_escape(f"note: {note}"))
    for finding in verdict.failures:
        print(terminal_escape(f"FAIL {finding.status}: {finding.describe()}"))
    print(f"fidelity check {verdict.summary()}")


def _record_verdict(history: Path, run_id: str, verdict: Verdict) -> bool:
    if not history.is_file():
        return False
    return record_verdict(
        history,
        run_id,
        passed=verdict.passed,
        baseline_run_id=verdict.baseline_run_id,
        summary=verdict.summary(),
    )


def command_check(args: argparse.Namespace) -> int:
    current = _side(args.run_dir)
    history = args.history or default_history_path()
    verdict = decide(
        current,
        _gate_settings(args),
        history=history,
        pinned=args.baseline,
        accept_config_change=args.accept_config_change,
    )
    if not args.no_record:
        _record_verdict(history, current.results.run_id, verdict)
    _print_verdict(verdict, current, as_json=args.json)
    return 0 if verdict.passed else 1


def _night_directory(root: Path, suite: str, now: datetime) -> Path:
    """ROOT/SUITE/YYYY-MM-DD, or with the time (and a count) when that night already ran."""
    folder = root / safe_filename(suite)
    for name in (f"{now:%Y-%m-%d}", f"{now:%Y-%m-%d-%H%M%S}"):
        if not (folder / name).exists():
            return folder / name
    count = 2
    while (folder / f"{now:%Y-%m-%d-%H%M%S}-{count}").exists():
        count += 1
    return folder / f"{now:%Y-%m-%d-%H%M%S}-{count}"


def command_nightly(args: argparse.Namespace) -> int:
    settings = _gate_settings(args)
    suite = load_suite(args.suite)
    if args.problem:
        suite = suite.with_problems(tuple(args.problem))
    history = args.history or default_history_path()
    check_history(history)
    if args.baseline is not None:
        _side(args.baseline)  # a bad pinned baseline is refused before the night's compute
    args.out = _night_directory(args.root, suite.name, datetime.now())
    args.no_history = False
    args.crash_dir = args.out  # a crash leaves its traceback in the night's directory
    _run(suite, args, quiet=args.json)
    current = _side(args.out)
    verdict = decide(
        current,
        settings,
        history=history,
        pinned=args.baseline,
        accept_config_change=args.accept_config_change,
    )
    _record_verdict(history, current.results.run_id, verdict)
    document = json.dumps(_verdict_document(verdict, current), indent=2)
    atomic_write_bytes(args.out / VERDICT_FILE, document.encode())
    _print_verdict(verdict, current, as_json=args.json)
    return 0 if verdict.passed else 1


#: What ``nightly`` writes beside results.json: the verdict, as ``check --json`` prints it.
VERDICT_FILE = "verdict.json"


def command_record(args: argparse.Namespace) -> int:
    path = args.history or default_history_path()
    results = RunResults.load(args.run_dir)
    check_history(path)
    append_run(path, results, args.run_dir if args.run_dir.is_dir() else args.run_dir.parent)
    print(terminal_escape(f"recorded run {results.run_id} of suite {results.suite_name} in {path}"))
    return 0


def command_figures(args: argparse.Namespace) -> int:
    check_writable(args.out, "output directory", directory=True)
    if not args.no_cache:
        check_writable(args.cache_dir or default_cache_dir(), "cache directory", directory=True)
    context = FigureContext(
        out=args.out,
        execution=Execution(cache=_cache(args), workers=args.workers),
        runs=tuple(args.run or ()),
    )
    for path in PAPER_FIGURES.get(args.name)(context):
        print(f"wrote {path}")
    return 0


def command_application(args: argparse.Namespace) -> int:
    # The Markdown file escapes data for Markdown; the terminal gets the sentences as written,
    # with control characters made visible.
    escapes = (md_escape, terminal_escape)

    cache = _cache(args)
    out = args.out or Path("runs") / f"{args.command}-{datetime.now():%Y%m%d-%H%M%S}"
    # Where the results go is checked before anything is computed.
    check_writable(out, "output directory", directory=True)
    history = None if args.no_history else (args.history or default_history_path())
    if history is not None:
        check_history(history)
    if cache.root is not None:
        check_writable(cache.root, "cache directory", directory=True)
    problem = load_problem(args.problem, cache=cache)
    if args.command == "explain":
        check_explained_point(problem, args.test, args.text, args.label)
    if args.command in ("perturb", "attack") and len(args.estimator or ()) > 1:
        raise FidelityError(f"fidelity {args.command} takes one --estimator")
    if args.command in ("perturb", "attack"):
        specs = args.estimator or [PERTURBATION_ESTIMATOR]
    elif args.command == "damping":
        specs = args.estimator or list(applications.damping.DEFAULT_DAMPED)
        applications.damping.check_grid(args.grid or applications.damping.DEFAULT_GRID)
        applications.damping.check_damped(specs)
    else:
        specs = args.estimator or list(DEFAULT_ESTIMATORS)
    # Estimators are built (settings checked, no work) before anything trains.
    estimators = applications.build_estimators(specs)
    trained = train(problem, cache=cache)
    figure = None
    if args.command == "explain":
        for estimator in estimators.values():
            estimator.fit(trained)
        loo: LooMode = args.loo or ("shown" if isinstance(problem.recipe, NewtonRecipe) else "none")
        result = applications.explain(
            trained,
            estimators,
            test_index=args.test,
            text=args.text,
            label=args.label,
            top=args.top,
            loo=loo,
        )
        text, shown = (render.render_explain(result, escape=e) for e in escapes)
    elif args.command == "poison":
        for estimator in estimators.values():
            estimator.fit(trained)
        result = applications.poison(
            trained, estimators, budget=args.budget, seeds=range(args.seeds), cache=cache
        )
        text, shown = (render.render_poison(result, escape=e) for e in escapes)
    elif args.command == "mislabel":
        result = applications.mislabel(
            trained,
            estimators,
            flip=args.flip,
            seeds=range(args.seeds),
            check_fractions=args.check or (0.05, 0.1, 0.2, 0.3),
            cache=cache,
        )
        figure = render.mislabel_figure(result, out / "mislabel.png").name
        text, shown = (render.render_mislabel(result, figure, escape=e) for e in escapes)
    elif args.command == "perturb":
        label, estimator = next(iter(estimators.items()))
        result = applications.perturbation_agreement(
            trained,
            estimator.fit(trained),
            test_points=args.test_points,
            train_points=args.train_points,
            eps=args.eps or applications.perturb.DEFAULT_EPS,
            seed=args.seed,
            execution=Execution(cache=cache),
            label=label,
        )
        text, shown = (render.render_perturb(result, escape=e) for e in escapes)
    elif args.command == "attack":
        label, estimator = next(iter(estimators.items()))
        result = applications.attack(
            trained,
            estimator.fit(trained),
            test_points=args.test_points,
            budget=args.budget,
            steps=args.steps,
            seed=args.seed,
            value_range=None if args.range is None else (args.range[0], args.range[1]),
            execution=Execution(cache=cache),
            label=label,
        )
        drawn = render.attack_figure(result, out / "attack.png")
        figure = None if drawn is None else drawn.name
        text, shown = (render.render_attack(result, figure, escape=e) for e in escapes)
    elif args.command == "damping":
        result = applications.damping_protocol(
            trained,
            specs,
            grid=args.grid or applications.damping.DEFAULT_GRID,
            test_points=args.test_points,
            subsets=args.subsets,
            alpha=args.alpha,
            seeds=args.seeds,
            seed=args.seed,
            execution=Execution(cache=cache),
        )
        figure = render.damping_figure(result, out / "damping.png").name
        text, shown = (render.render_damping(result, figure, escape=e) for e in escapes)
    else:
        reference, estimator = next(iter(estimators.items()))
        result = applications.prefilter(
            trained,
            estimator.fit(trained),
            reference=reference,
            test_points=range(min(args.test_points, problem.n_test)),
            top=args.top,
        )
        figure = render.prefilter_figure(result, out / "prefilter.png").name
        text, shown = (render.render_prefilter(result, figure, escape=e) for e in escapes)
    # What the output was made with, as a run's results carry it; and its row in the history.
    result = {**result, "provenance": {**provenance(), "command": ["fidelity", *args.argv]}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.command}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / f"{args.command}.md").write_text(text, encoding="utf-8")
    print(shown)
    print(f"wrote {out}")
    if history is not None:
        record_application(history, result, out)
        print(terminal_escape(f"recorded in history {history}"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logs.configure(args.verbose - args.quiet)
    # `package.module:name` specs resolve from the working directory, as `python -m` would
    # (the console script's own folder is bin/, so a project's modules were not found).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    handlers = {
        "run": command_run,
        "score": command_score,
        "list": command_list,
        "cache": command_cache,
        "report": command_report,
        "history": command_history,
        "check": command_check,
        "figures": command_figures,
        "record": command_record,
        "nightly": command_nightly,
    }
    handlers.update(dict.fromkeys(APPLICATIONS, command_application))
    try:
        return handlers[args.command](args)
    except FidelityError as exc:
        message = terminal_escape(" ".join(str(exc).split()))
        print(f"fidelity: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fidelity: interrupted; cached results are kept and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours, not bad input: its own status, traceback kept
        log = crash_log(exc, getattr(args, "crash_dir", None))
        summary = terminal_escape(" ".join(f"{type(exc).__name__}: {exc}".split()))[:300]
        print(
            f"fidelity: internal error (a bug; please report it): {summary}; traceback in {log}",
            file=sys.stderr,
        )
        return INTERNAL_ERROR


#: Exit statuses: 0 passed, 1 regressed (check), 2 bad input, 3 internal error, 130 interrupted.
INTERNAL_ERROR = 3


def crash_log(exc: BaseException, folder: Path | None = None) -> Path:
    """Write ``exc``'s traceback, the command line and versions to a file in ``folder`` (a
    night's run directory), else the temporary directory (``$FIDELITY_CRASH_DIR`` where set),
    and return its path."""
    folder = folder or Path(os.environ.get("FIDELITY_CRASH_DIR") or tempfile.gettempdir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir())
    path = folder / f"fidelity-crash-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.txt"
    header = (
        f"fidelity {__version__}, python {sys.version.split()[0]}, {platform.platform()}\n"
        f"command: {' '.join(sys.argv)}\n\n"
    )
    path.write_text(header + "".join(traceback.format_exception(exc)), encoding="utf-8")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
