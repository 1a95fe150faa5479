"""Time to score 50 test x all 1,437 training points of digits-mlp, for every estimator.

Each estimator is timed for fit + scores and compared (pooled Pearson, relative error) with its
dense reference at the same damping: `exact` for Hessian-based solvers, `gnh` for Gauss-Newton
ones and the baselines. Settings are those of the bundled `solvers` suite for digits-mlp.
Where pyDVL is importable (the environment of benchmarks/peers_env.sh) the same model and data
are scored by its direct, CG, LiSSA and Arnoldi solvers through `fidelity.estimators.external.pydvl`
(same damping, LiSSA with our fitted scale and depth, Arnoldi with our rank), and the benchmark
prints each peer's time, the ratio to ours, and its Pearson correlation with our estimator and
with the dense reference. Likewise captum's naive (dense, full projection) and Arnoldi influence
functions through `fidelity.estimators.external.captum`. Each peer and ours are timed fairly
(benchmarks/fair.py: both pinned to 1 and to 2 threads, ``--rounds`` alternating rounds, each
side's median at its best thread count). torch-influence is not on PyPI: it is reported as
importable or not.

    python -m benchmarks.estimators [--problem digits-mlp] [--test-points 50]
    .peers-venv/bin/python -m benchmarks.estimators      # with the peer comparison
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings

import numpy as np
import torch

from benchmarks.fair import agreement, alternate, machine
from fidelity.estimators import ESTIMATORS
from fidelity.problems import load_problem
from fidelity.retrain import train
from fidelity.suite import build_component, load_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--test-points", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per peer")
    args = parser.parse_args()

    trained = train(load_problem(args.problem))
    problem = trained.problem
    test = problem.test.subset(torch.arange(args.test_points))
    suite = load_suite("solvers")
    results = {}
    for spec in suite.estimators:
        settings = suite.settings_for(spec, args.problem)
        estimator = build_component(ESTIMATORS, spec.kind, settings, where=spec.label)
        start = time.perf_counter()
        scores = estimator.fit(trained).scores(test, problem.train)
        results[spec.label] = (time.perf_counter() - start, scores, settings)

    def reference_for(settings: dict) -> str:
        return "exact" if settings.get("curvature", "hessian") == "hessian" else "gnh"

    print(
        f"{args.problem}: {args.test_points} test x {problem.n_train} train, "
        f"p = {trained.n_params}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'estimator':<10} {'seconds':>8} {'reference':>10} {'pearson':>9} {'rel.err':>9}")
    for label, (seconds, scores, settings) in results.items():
        kind = next(s.kind for s in suite.estimators if s.label == label)
        reference = "gnh" if kind in ("gnh", "grad-dot", "grad-cos") else reference_for(settings)
        expected = results[reference][1]
        r = np.corrcoef(scores.flatten(), expected.flatten())[0, 1]
        error = float((scores - expected).norm() / expected.norm())
        print(f"{label:<10} {seconds:>8.2f} {reference:>10} {r:>9.5f} {error:>9.2e}")
    print(
        "peers: each side pinned to 1 and to 2 threads, alternating rounds "
        f"(--rounds {args.rounds}), median at its best thread count; {machine()}"
    )
    if importlib.util.find_spec("pydvl") is not None:
        compare_pydvl(trained, test, results, args.rounds)
    else:
        print("peer pydvl: not installed (bash benchmarks/peers_env.sh)")
    if importlib.util.find_spec("captum") is not None:
        compare_captum(trained, test, results, args.rounds)
    else:
        print("peer captum: not installed (bash benchmarks/peers_env.sh)")
    found = importlib.util.find_spec("torch_influence") is not None
    print(f"peer torch_influence: {'importable, no adapter' if found else 'not installed'}")


def compare(label, ours_label, ours_call, peer_call, results, rounds) -> None:
    """Ours and the peer alternated and pinned (benchmarks/fair.py); each at its best thread
    count."""
    timings = alternate({"ours": ours_call, "peer": peer_call}, rounds)
    (ours_threads, ours_seconds), (peer_threads, peer_seconds) = (
        timings.best("ours"),
        timings.best("peer"),
    )
    scores, ours_scores = timings.outputs["peer"], timings.outputs["ours"]
    r_ours, _ = agreement(scores, ours_scores)
    r_reference, _ = agreement(scores, results["exact"][1])
    r_ours_reference, _ = agreement(ours_scores, results["exact"][1])
    print(
        f"{label:<10} {peer_seconds:>8.2f} ({peer_threads}t) {ours_label:<8} "
        f"{ours_seconds:>7.2f} ({ours_threads}t) {peer_seconds / ours_seconds:>6.1f}x "
        f"{r_ours:>9.5f} {r_reference:>9.5f} {r_ours_reference:>9.5f}"
    )


def header(library: str) -> None:
    print(
        f"{library:<10} {'seconds':>13} {'ours':<8} {'seconds':>12} {'ratio':>7} {'r(ours)':>9} "
        f"{'r(ref)':>9} {'ours r(ref)':>11}"
    )


def quiet(call):
    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call()

    return run


def compare_captum(trained, test, results, rounds) -> None:
    from fidelity.estimators.external.captum import CaptumEstimator

    header("captum")
    train_set = trained.problem.train
    for method, ours in (("naive", "exact"), ("arnoldi", "arnoldi")):
        settings = results[ours][2]
        options = {"damping": settings.get("damping", 0.0)}
        if method == "arnoldi":
            options.update(rank=settings["rank"], iterations=2 * settings["rank"], tol=1e-10)
        ours_estimator = build_ours(ours, settings)
        compare(
            method,
            ours,
            lambda e=ours_estimator: e.fit(trained).scores(test, train_set),
            quiet(
                lambda o=options, m=method: (
                    CaptumEstimator(method=m, **o).fit(trained).scores(test, train_set)
                )
            ),
            results,
            rounds,
        )


def compare_pydvl(trained, test, results, rounds) -> None:
    from fidelity.estimators.external.pydvl import PydvlEstimator

    problem = trained.problem
    header("pydvl")
    pairs = {"direct": "exact", "cg": "cg", "lissa": "lissa", "arnoldi": "arnoldi"}
    for solver, ours in pairs.items():
        settings = dict(results[ours][2])
        options = {"damping": settings.get("damping", 0.0)}
        if solver == "lissa":
            fitted_scale = ESTIMATORS.get("lissa")(**settings).fit(trained).diagnostics["scale"]
            options.update(scale=fitted_scale, depth=settings["depth"])
            # pyDVL draws one batch of its loader (batch_size examples) per step: ours runs at
            # that minibatch too, so the two run the same recursion on equal work.
            settings["minibatch_size"] = PydvlEstimator().batch_size
        if solver == "arnoldi":
            options["rank"] = settings["rank"]
        if solver == "cg":
            options["tol"] = settings["tol"]
        ours_estimator = build_ours(ours, settings)
        compare(
            solver,
            ours,
            lambda e=ours_estimator: e.fit(trained).scores(test, problem.train),
            quiet(
                lambda o=options, s=solver: (
                    PydvlEstimator(solver=s, **o).fit(trained).scores(test, problem.train)
                )
            ),
            results,
            rounds,
        )


def build_ours(label: str, settings: dict):
    """Our estimator of the suite entry ``label`` (whose kind is its label)."""
    return build_component(ESTIMATORS, label, settings, where=label)


if __name__ == "__main__":
    main()
