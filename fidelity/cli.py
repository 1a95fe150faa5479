"""The ``fidelity`` command line: ``run`` and ``list``."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from fidelity.cache import default_cache_dir
from fidelity.errors import FidelityError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fidelity", description="Validate influence estimators against retraining."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a suite and write a run directory")
    run.add_argument("suite", help="bundled suite name (e.g. smoke) or path to a suite .toml")
    run.add_argument(
        "--problem",
        action="append",
        metavar="NAME",
        help="run only these problems (registry name or package.module:function); repeatable",
    )
    run.add_argument("--out", type=Path, help="run directory (default runs/<suite>-<time>)")
    run.add_argument("--workers", type=_positive_int, default=1, help="retraining processes")
    run.add_argument(
        "--backend",
        default="loky",
        help="joblib backend: loky (default), threading, sequential, or dask (needs --scheduler "
        "and the [dask] extra)",
    )
    run.add_argument(
        "--scheduler", metavar="ADDRESS", help="dask scheduler address, e.g. tcp://host:8786"
    )
    run.add_argument(
        "--cache-dir",
        type=Path,
        help="artefact cache (default $FIDELITY_CACHE_DIR or ~/.cache/fidelity)",
    )
    run.add_argument("--no-cache", action="store_true", help="recompute everything, store nothing")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")

    commands.add_parser("list", help="list problems, estimators, responses and bundled suites")
    return parser


def command_run(args: argparse.Namespace) -> int:
    from fidelity.runner import RunOptions, run_suite
    from fidelity.suite import load_suite

    suite = load_suite(args.suite)
    if args.problem:
        suite = suite.with_problems(tuple(args.problem))
    out = args.out or Path("runs") / f"{suite.name}-{datetime.now():%Y%m%d-%H%M%S}"
    options = RunOptions(
        out=out,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        workers=args.workers,
        backend=args.backend,
        scheduler=args.scheduler,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    results = run_suite(suite, options)
    for name, problem in results["problems"].items():
        for estimator, by_response in problem["metrics"].items():
            for response, metrics in by_response.items():
                pearson, spearman = metrics["pearson"], metrics["spearman"]
                print(
                    f"{name:<18} {estimator:>10} vs {response:<8} "
                    f"pearson {_fmt(pearson)}  spearman {_fmt(spearman)}"
                )
    print(f"wrote {out} in {results['timings']['total_seconds']:.1f} s")
    return 0


def _fmt(entry: dict[str, float | None]) -> str:
    if entry["value"] is None:
        return "n/a"
    if entry["low"] is None:
        return f"{entry['value']:.4f}"
    return f"{entry['value']:.4f} [{entry['low']:.4f}, {entry['high']:.4f}]"


def command_list(_: argparse.Namespace) -> int:
    from estimators import ESTIMATORS
    from fidelity.problems import PROBLEMS
    from fidelity.suite import builtin_suites
    from retrain import RESPONSES

    for title, registry in (
        ("problems", PROBLEMS),
        ("estimators", ESTIMATORS),
        ("responses", RESPONSES),
    ):
        print(f"{title}:")
        for name in registry.names():
            print(f"  {name:<18} {registry.description(name)}")
    print("suites:")
    for name in builtin_suites():
        print(f"  {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": command_run, "list": command_list}
    try:
        return handlers[args.command](args)
    except FidelityError as exc:
        message = " ".join(str(exc).split())
        print(f"fidelity: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fidelity: interrupted; cached results are kept and a rerun resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
