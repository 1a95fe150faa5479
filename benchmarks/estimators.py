"""Time to score 50 test x all 1,437 training points of digits-mlp, for every estimator.

Each estimator is timed for fit + scores and compared (pooled Pearson, relative error) with its
dense reference at the same damping: `exact` for Hessian-based solvers, `gnh` for Gauss-Newton
ones and the baselines. Settings are those of the bundled `solvers` suite for digits-mlp.
Where pyDVL is importable (the environment of benchmarks/peers_env.sh) the same model and data
are scored by its direct, CG, LiSSA and Arnoldi solvers through `fidelity.estimators.external.pydvl`
(same damping, LiSSA with our fitted scale and depth, Arnoldi with our rank), and the benchmark
prints each peer's time, the ratio to ours, and its Pearson correlation with our estimator and
with the dense reference. Likewise captum's naive (dense, full projection) and Arnoldi influence
functions through `fidelity.estimators.external.captum`. torch-influence is not on PyPI: it is
reported as importable or not.

    python -m benchmarks.estimators [--problem digits-mlp] [--test-points 50]
    .peers-venv/bin/python -m benchmarks.estimators      # with the peer comparison
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

from fidelity.estimators import ESTIMATORS
from fidelity.problems import load_problem
from fidelity.retrain import train
from fidelity.suite import build_component, load_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--test-points", type=int, default=50)
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
    if importlib.util.find_spec("pydvl") is not None:
        compare_pydvl(trained, test, results)
    else:
        print("peer pydvl: not installed (bash benchmarks/peers_env.sh)")
    if importlib.util.find_spec("captum") is not None:
        compare_captum(trained, test, results)
    else:
        print("peer captum: not installed (bash benchmarks/peers_env.sh)")
    found = importlib.util.find_spec("torch_influence") is not None
    print(f"peer torch_influence: {'importable, no adapter' if found else 'not installed'}")


def compare_captum(trained, test, results) -> None:
    import warnings

    from fidelity.estimators.external.captum import CaptumEstimator

    print(f"{'captum':<10} {'seconds':>8} {'ours':>8} {'ratio':>7} {'r(ours)':>9} {'r(ref)':>9}")
    for method, ours in (("naive", "exact"), ("arnoldi", "arnoldi")):
        ours_seconds, ours_scores, settings = results[ours]
        options = {"damping": settings.get("damping", 0.0)}
        if method == "arnoldi":
            options.update(rank=settings["rank"], iterations=2 * settings["rank"], tol=1e-10)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = (
                CaptumEstimator(method=method, **options)
                .fit(trained)
                .scores(test, trained.problem.train)
            )
        report_peer(method, time.perf_counter() - start, scores, ours_seconds, ours_scores, results)


def report_peer(name, seconds, scores, ours_seconds, ours_scores, results) -> None:
    r_ours = np.corrcoef(scores.flatten(), ours_scores.flatten())[0, 1]
    r_reference = np.corrcoef(scores.flatten(), results["exact"][1].flatten())[0, 1]
    print(
        f"{name:<10} {seconds:>8.2f} {ours_seconds:>8.2f} {seconds / ours_seconds:>6.1f}x "
        f"{r_ours:>9.5f} {r_reference:>9.5f}"
    )


def compare_pydvl(trained, test, results) -> None:
    import warnings

    from fidelity.estimators.external.pydvl import PydvlEstimator

    problem = trained.problem
    print(f"{'pydvl':<10} {'seconds':>8} {'ours':>8} {'ratio':>7} {'r(ours)':>9} {'r(ref)':>9}")
    pairs = {"direct": "exact", "cg": "cg", "lissa": "lissa", "arnoldi": "arnoldi"}
    for solver, ours in pairs.items():
        ours_seconds, ours_scores, settings = results[ours]
        options = {"damping": settings.get("damping", 0.0)}
        if solver == "lissa":
            fitted_scale = ESTIMATORS.get("lissa")(**settings).fit(trained).diagnostics["scale"]
            options.update(scale=fitted_scale, depth=settings["depth"])
            # pyDVL draws one batch of its loader (batch_size examples) per step: time ours at
            # that minibatch too, so the two run the same recursion on equal work.
            same = {**settings, "minibatch_size": PydvlEstimator().batch_size}
            start = time.perf_counter()
            same_scores = ESTIMATORS.get("lissa")(**same).fit(trained).scores(test, problem.train)
            ours_seconds, ours_scores = time.perf_counter() - start, same_scores
            r = np.corrcoef(same_scores.flatten(), results["exact"][1].flatten())[0, 1]
            print(
                f"(ours lissa at minibatch {same['minibatch_size']}: {ours_seconds:.2f} s, "
                f"r(ref) {r:.5f})"
            )
        if solver == "arnoldi":
            options["rank"] = settings["rank"]
        if solver == "cg":
            options["tol"] = settings["tol"]
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = (
                PydvlEstimator(solver=solver, **options).fit(trained).scores(test, problem.train)
            )
        report_peer(solver, time.perf_counter() - start, scores, ours_seconds, ours_scores, results)


if __name__ == "__main__":
    main()
