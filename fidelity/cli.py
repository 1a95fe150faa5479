"""The ``fidelity`` command line: ``run`` and ``list``."""

from __future__ import annotations

import argparse
import os
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
    _add_applications(commands)
    return parser


APPLICATIONS = ("explain", "poison", "mislabel", "prefilter")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _add_applications(commands) -> None:
    from fidelity.applications.common import DEFAULT_ESTIMATORS

    def common(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("problem", help="problem name, e.g. 'movies-minilm-logreg[size=2000]'")
        command.add_argument(
            "--estimator",
            action="append",
            metavar="SPEC",
            help="estimator as kind or kind[key=value,...], repeatable (default: "
            f"{', '.join(DEFAULT_ESTIMATORS)})",
        )
        command.add_argument(
            "--out", type=Path, help=f"output directory (default runs/{name}-<time>)"
        )
        command.add_argument(
            "--cache-dir", type=Path, help="artefact cache (trained models, encodings)"
        )
        command.add_argument("--no-cache", action="store_true", help="recompute everything")
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


def _use_cache_dir(args: argparse.Namespace) -> None:
    # Problem factories (the text encodings) find the cache through the environment, so that
    # --cache-dir holds everything a run computes.
    if args.cache_dir and not args.no_cache:
        os.environ["FIDELITY_CACHE_DIR"] = str(args.cache_dir)


def command_run(args: argparse.Namespace) -> int:
    from fidelity.runner import RunOptions, run_suite
    from fidelity.suite import load_suite

    _use_cache_dir(args)
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


def command_application(args: argparse.Namespace) -> int:
    import json

    from fidelity import applications
    from fidelity.applications.common import DEFAULT_ESTIMATORS
    from fidelity.cache import ArtifactCache
    from fidelity.problem import NewtonRecipe
    from fidelity.problems import load_problem
    from reports import applications as render
    from retrain import train

    _use_cache_dir(args)
    cache = ArtifactCache(None if args.no_cache else (args.cache_dir or default_cache_dir()))
    out = args.out or Path("runs") / f"{args.command}-{datetime.now():%Y%m%d-%H%M%S}"
    problem = load_problem(args.problem)
    trained = train(problem, cache=cache)
    specs = args.estimator or list(DEFAULT_ESTIMATORS)
    estimators = applications.build_estimators(specs)
    figure = None
    if args.command == "explain":
        for estimator in estimators.values():
            estimator.fit(trained)
        loo = args.loo or ("shown" if isinstance(problem.recipe, NewtonRecipe) else "none")
        result = applications.explain(
            trained,
            estimators,
            test_index=args.test,
            text=args.text,
            label=args.label,
            top=args.top,
            loo=loo,
        )
        text = render.render_explain(result)
    elif args.command == "poison":
        for estimator in estimators.values():
            estimator.fit(trained)
        result = applications.poison(
            trained, estimators, budget=args.budget, seeds=range(args.seeds), cache=cache
        )
        text = render.render_poison(result)
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
        text = render.render_mislabel(result, figure)
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
        text = render.render_prefilter(result, figure)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.command}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / f"{args.command}.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"run": command_run, "list": command_list}
    handlers.update(
        dict.fromkeys(("explain", "poison", "mislabel", "prefilter"), command_application)
    )
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
