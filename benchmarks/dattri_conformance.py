"""dattri's influence-function solvers against the reference each one claims, on digits-mlp: the
seconds of each dattri fit+scores, the Pearson correlation and largest relative difference of its
scores (converted to our convention) with the reference, and the reference's own seconds.

References: explicit, cg, lissa and arnoldi against our ``exact`` at the same damping (arnoldi
also against our ``arnoldi`` at the same rank and Krylov steps, which separates truncation from
implementation); ekfac against our ``ekfac`` with the same (empirical) Fisher and absolute
damping; datainf against ``exact`` and against DataInf's own per-layer closed form. A row is
flagged when its Pearson is below 0.999 or its scores hold NaN or inf. Needs the peers
environment:

    bash benchmarks/peers_env.sh
    .peers-venv/bin/python -m benchmarks.dattri_conformance [--damping 0.01] [--test-points 50]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # dattri's attribute() draws progress bars

import numpy as np
import torch

from fidelity.core.cache import ArtifactCache
from fidelity.core.objective import per_example_grads
from fidelity.estimators import ArnoldiEstimator, EkfacEstimator, ExactEstimator
from fidelity.estimators.external.dattri import DattriEstimator
from fidelity.estimators.kfac import select_layers
from fidelity.problems import load_problem
from fidelity.retrain import train


def timed_scores(estimator, trained, test) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    scores = estimator.fit(trained).scores(test, trained.problem.train)
    return time.perf_counter() - start, scores


def datainf_closed_form(trained, test, regularization: float) -> tuple[float, torch.Tensor]:
    """(1/N) g_j^T q_t with q_t = (1/N) sum_i (g_i g_i^T + r I)^{-1} g_t, per layer."""
    start = time.perf_counter()
    problem = trained.problem
    g_train = per_example_grads(trained.model, problem.loss, trained.theta, problem.train)
    g_test = per_example_grads(trained.model, problem.loss, trained.theta, test)
    transformed = torch.zeros_like(g_test)
    for block in select_layers(trained.model, None)[0]:
        index = torch.arange(block.weight.start, block.weight.stop)
        if block.bias is not None:
            index = torch.cat([index, torch.arange(block.bias.start, block.bias.stop)])
        v, g = g_test[:, index], g_train[:, index]
        coefficients = (v @ g.T) / (regularization + g.pow(2).sum(1))
        transformed[:, index] = (v - coefficients @ g / problem.n_train) / regularization
    scores = transformed @ g_train.T / problem.n_train
    return time.perf_counter() - start, scores


def compare(theirs: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, str]:
    a, b = theirs.flatten().numpy(), reference.flatten().numpy()
    nonfinite = int((~np.isfinite(a)).sum())
    if nonfinite:
        return float("nan"), float("nan"), f"{nonfinite} NaN/inf"
    r = float(np.corrcoef(a, b)[0, 1])
    relative = float(np.abs(a - b).max() / np.abs(b).max())
    return r, relative, "" if r >= 0.999 else "Pearson < 0.999"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="digits-mlp")
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--test-points", type=int, default=50)
    parser.add_argument("--cg-iterations", type=int, default=60)
    parser.add_argument("--arnoldi-rank", type=int, default=100)
    parser.add_argument("--arnoldi-iterations", type=int, default=150)
    parser.add_argument("--lissa-depth", type=int, default=30)
    parser.add_argument("--lissa-scale", type=float, default=1.0)
    parser.add_argument("--cache-dir", default=None, help="cache theta_s here (default: none)")
    args = parser.parse_args()
    trained = train(load_problem(args.problem), cache=ArtifactCache(args.cache_dir))
    problem = trained.problem
    test = problem.test.subset(torch.arange(args.test_points))
    damping = args.damping
    shift = problem.weight_decay + damping
    print(
        f"{args.problem}: {args.test_points} test x {problem.n_train} train, p = "
        f"{trained.n_params}, damping {damping:g} (dattri regularization wd + damping = "
        f"{shift:g}), torch threads {torch.get_num_threads()}"
    )
    references: dict[str, tuple[float, torch.Tensor]] = {}

    def reference(name: str, make) -> tuple[float, torch.Tensor]:
        if name not in references:
            references[name] = make()
        return references[name]

    exact = ("exact", lambda: timed_scores(ExactEstimator(damping=damping), trained, test))
    rank, steps = args.arnoldi_rank, args.arnoldi_iterations
    rows = [
        ("explicit", {}, [exact]),
        ("cg", {"iterations": args.cg_iterations}, [exact]),
        ("lissa", {"depth": args.lissa_depth, "scale": args.lissa_scale}, [exact]),
        (
            "arnoldi",
            {"rank": rank, "iterations": steps + 1},  # dattri takes max_iter - 1 Krylov steps
            [
                exact,
                (
                    f"arnoldi r={rank}",
                    lambda: timed_scores(
                        ArnoldiEstimator(damping=damping, rank=rank, iterations=steps),
                        trained,
                        test,
                    ),
                ),
            ],
        ),
        (
            "ekfac",
            {},
            [
                (
                    "ekfac empirical",
                    lambda: timed_scores(
                        EkfacEstimator(damping=damping, fisher="empirical"),
                        trained,
                        test,
                    ),
                )
            ],
        ),
        (
            "datainf",
            {},
            [exact, ("DataInf closed form", lambda: datainf_closed_form(trained, test, shift))],
        ),
    ]
    header = (
        f"  {'dattri solver':36s} {'seconds':>8s}  {'reference':20s} {'ref s':>7s}  "
        f"{'Pearson':>9s}  {'max rel diff':>12s}  flag"
    )
    print(header)
    flagged = 0
    for solver, options, against in rows:
        settings = ", ".join(f"{k}={v}" for k, v in options.items())
        label = f"{solver} ({settings})" if settings else solver
        estimator = DattriEstimator(solver=solver, damping=damping, **options)
        seconds, theirs = timed_scores(estimator, trained, test)
        for index, (name, make) in enumerate(against):
            ref_seconds, ref_scores = reference(name, make)
            r, relative, flag = compare(theirs, ref_scores)
            flagged += bool(flag)
            shown = f"{label:36s} {seconds:8.2f}" if index == 0 else f"{'':36s} {'':8s}"
            print(
                f"  {shown}  {name:20s} {ref_seconds:7.2f}  {r:9.6f}  {relative:12.3e}  "
                f"{'** ' + flag if flag else ''}"
            )
        if estimator.diagnostics.get("library_warnings"):
            for message in estimator.diagnostics["library_warnings"]:
                print(f"  {'':36s} dattri warned: {message[:90]}")
    print(f"{flagged} flagged row(s)")


if __name__ == "__main__":
    main()
