"""Retraining throughput: exact refits against scikit-learn, vmapped groups against one model
at a time, and worker scaling.

``--part convex`` (``--problem``, default digits-logreg; also cancer-logreg and
movies-minilm-logreg, 8,454 points, whose encodings ``--cache-dir`` keeps): fidelity's `cold`
against scikit-learn. Both solve the same objective,
J_{-j} = (1/N) sum_{i != j} L_i + (wd/2) ||theta||^2 with the bias penalised like every
weight: scikit-learn gets a constant feature instead of an intercept, C = 1/(N wd), and
sample weight 0 for the removed point (so the 1/N is unchanged), warm-started from theta_s with
tol 1e-10. Fair: both sides pinned to the same threads (torch.set_num_threads, threadpoolctl),
each in every configuration (1 thread, 2 threads, 2 processes of 1 thread) and scikit-learn
with each of its solvers lbfgs, newton-cg and newton-cholesky, in ``--rounds`` alternating
rounds, no cache on our side; ours both to the float floor (`cold`'s default) and stopped at
each of ``--refit-tolerance`` (default 1e-10 and 1e-11: a sweep of our stopping rule, against
scikit-learn's fixed 1e-10). Prints medians and spreads, every variant's largest
difference from our float-floor deltas, the best configuration of each side and their ratio
(ours at the floor), the ratio at equal agreement (our fastest variant at most as far from the
floor as the fastest scikit-learn configuration), the load average, and a roofline line: our
arithmetic (the dominant GEMMs, counted) per second against a dense float64 GEMM's rate at the
same threads.

``--part subsets``: the same comparison for ``--subsets`` refits keeping a fraction ``--alpha``
of the training set (the datamodeling score's ground truth; scikit-learn gets each mask as
sample weights): fidelity's `subsets` response, vmapped (``refit_weighted``).

``--part warm`` (digits-mlp): the `warm` stage for ``--removals`` removals trained in vmapped
groups (``--group-size``, default 128: one group) against the same stage with groups of one (one
model at a time), in the same process, after an untimed warm-up; prints both times, the ratio
and the largest difference between the deltas.

``--part workers`` (digits-mlp): the `cold` stage (groups of 25) with 1 and with 2 loky
workers; prints both times and the ratio.

    python -m benchmarks.retrain_throughput [--part all] [--removals 100] [--rounds 3]
    python -m benchmarks.retrain_throughput --part convex --problem cancer-logreg
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from fidelity.core.affine import affine_form
from fidelity.core.cache import ArtifactCache
from fidelity.problems import load_problem
from fidelity.retrain import ColdResponse, Execution, SubsetsResponse, WarmResponse, train
from fidelity.retrain.subsets import draw_masks


def sklearn_design(problem, test_index: np.ndarray):
    x = np.hstack([problem.x_train.numpy(), np.ones((problem.n_train, 1))])
    x_test = np.hstack([problem.x_test.numpy(), np.ones((problem.n_test, 1))])[test_index]
    # bce problems keep their labels as [N, 1] floats; scikit-learn takes class indices
    y, y_test = (
        np.asarray(t.numpy()).reshape(len(t), -1)[:, 0] for t in (problem.y_train, problem.y_test)
    )
    return x, y.astype(np.int64), x_test, y_test.astype(np.int64)[test_index]


def sklearn_model(problem, solver: str, tol: float):
    from sklearn.linear_model import LogisticRegression

    c = 1.0 / (problem.n_train * problem.weight_decay)
    return LogisticRegression(C=c, fit_intercept=False, tol=tol, max_iter=100_000, solver=solver)


def sklearn_full(problem, test_index, solver: str, tol: float):
    """The full model (theta_s) and its test losses, fitted once, untimed."""
    x, y, x_test, y_test = sklearn_design(problem, test_index)
    model = sklearn_model(problem, solver, tol).fit(x, y)
    base = -model.predict_log_proba(x_test)[np.arange(len(y_test)), y_test]
    return model.coef_.copy(), base


def sklearn_chunk(problem, test_index, weights, solver, tol, full_coef, base) -> np.ndarray:
    """Deltas ``[n_test, n_models]`` of the refits with sample weights ``weights`` ``[m, N]``
    (a zero at the removed point, or a subset's mask), each warm-started from theta_s (as
    ours are)."""
    x, y, x_test, y_test = sklearn_design(problem, test_index)
    model = sklearn_model(problem, solver, tol).set_params(warm_start=True)
    deltas = np.empty((len(test_index), len(weights)))
    for column, sample_weight in enumerate(weights):
        model.coef_ = full_coef.copy()
        model.fit(x, y, sample_weight=sample_weight)
        loss = -model.predict_log_proba(x_test)[np.arange(len(y_test)), y_test]
        deltas[:, column] = loss - base
    return deltas


def sklearn_refits(problem, weights, test_index, solver, tol, processes, full):
    """(seconds, deltas) of the scikit-learn loop over the rows of ``weights``, over
    ``processes`` loky workers (one BLAS thread each) when more than one."""
    from joblib import Parallel, delayed

    start = time.perf_counter()
    if processes == 1:
        deltas = sklearn_chunk(problem, test_index, weights, solver, tol, *full)
    else:
        chunks = np.array_split(weights, processes)
        parts = Parallel(n_jobs=processes, backend="loky")(
            delayed(sklearn_chunk)(problem, test_index, chunk, solver, tol, *full)
            for chunk in chunks
        )
        deltas = np.concatenate(parts, axis=1)
    return time.perf_counter() - start, deltas


def sample(problem, args) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    removed = np.sort(rng.choice(problem.n_train, args.removals, replace=False))
    test_index = np.sort(rng.choice(problem.n_test, args.test_points, replace=False))
    return removed, test_index


def timed(response, trained, test, removed, execution) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = response.compute(trained, test, torch.as_tensor(removed), execution)
    return time.perf_counter() - start, result.deltas


def warm_groups(args) -> None:
    problem = load_problem("digits-mlp")
    trained = train(problem)
    removed, test_index = sample(problem, args)
    test = problem.test.subset(torch.as_tensor(test_index))
    execution = Execution()
    # One untimed epoch first, so that neither timing carries torch's first-call costs.
    timed(WarmResponse(epochs=1, group_size=2), trained, test, removed[:2], execution)
    grouped_seconds, grouped = timed(
        WarmResponse(epochs=args.warm_epochs, group_size=args.group_size),
        trained,
        test,
        removed,
        execution,
    )
    single_seconds, single = timed(
        WarmResponse(epochs=args.warm_epochs, group_size=1), trained, test, removed, execution
    )
    scale = float(grouped.abs().max())
    print(
        f"digits-mlp: {args.removals} warm-start retrains ({args.warm_epochs} epochs each, plus "
        f"the no-removal control), torch threads {torch.get_num_threads()}"
    )
    print(f"  vmapped groups of {args.group_size}: {grouped_seconds:8.2f} s")
    print(f"  one model at a time:  {single_seconds:8.2f} s")
    print(f"  speed-up: {single_seconds / grouped_seconds:.1f}x")
    print(
        "  max |delta_grouped - delta_single| / max |delta|: "
        f"{float((grouped - single).abs().max()) / scale:.2e}"
    )


def cold_workers(args) -> None:
    problem = load_problem("digits-mlp")
    trained = train(problem)
    removed, test_index = sample(problem, args)
    test = problem.test.subset(torch.as_tensor(test_index))
    response = ColdResponse(group_size=25)
    one_seconds, one = timed(response, trained, test, removed, Execution(workers=1))
    two_seconds, two = timed(response, trained, test, removed, Execution(workers=2))
    print(f"digits-mlp: {args.removals} cold-start retrains (groups of 25, recipe's epochs)")
    print(f"  1 worker:  {one_seconds:8.2f} s")
    print(f"  2 workers: {two_seconds:8.2f} s")
    print(f"  ratio 1 worker / 2 workers: {one_seconds / two_seconds:.2f}")
    print(f"  max |delta_1 - delta_2|: {float((one - two).abs().max()):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["all", "convex", "subsets", "warm", "workers"], default="all"
    )
    parser.add_argument("--problem", default="digits-logreg", help="convex and subsets parts")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--cache-dir", help="where text problems keep their encodings")
    parser.add_argument("--removals", type=int, default=100)
    parser.add_argument("--test-points", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (convex)")
    parser.add_argument(
        "--refit-tolerance",
        type=float,
        nargs="+",
        default=[1e-10, 1e-11],
        help="our further leave-one-out variants: cold's tolerance (gradient norm)",
    )
    parser.add_argument("--warm-epochs", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=128, help="warm group size")
    args = parser.parse_args()
    if args.part in ("all", "convex", "subsets"):
        convex_refits(args)
    if args.part in ("all", "warm"):
        warm_groups(args)
    if args.part in ("all", "workers"):
        cold_workers(args)


#: (name, torch/BLAS threads per process, processes) given to each side in turn.
CONFIGURATIONS = (("1 thread", 1, 1), ("2 threads", 2, 1), ("2 processes x 1 thread", 1, 2))
SKLEARN_SOLVERS = ("lbfgs", "newton-cg", "newton-cholesky")


def convex_refits(args) -> None:
    """Leave-one-out refits (``--part convex``) or subset refits (``--part subsets``) of a convex
    problem, ours against scikit-learn, fair: both sides pinned to the same threads
    (torch.set_num_threads; threadpoolctl for numpy/scipy/scikit-learn), each in every
    configuration (and scikit-learn with every solver that takes sample weights and warm
    starts), alternating rounds; medians and spreads; the best configuration of each side is
    compared, and our arithmetic rate against the machine's dense GEMM peak.

    Leave-one-out also runs ours at each ``--refit-tolerance`` (stop at that gradient norm
    instead of the float floor, `cold`'s ``tolerance``) and prints every variant's error against our
    float-floor deltas, so that the sides are also compared at equal agreement: our fastest
    variant whose deltas are at least as close to the floor as the fastest scikit-learn
    configuration's."""
    from threadpoolctl import threadpool_limits

    cache = ArtifactCache(args.cache_dir) if args.cache_dir else None
    problem = load_problem(args.problem, cache=cache)
    trained = train(problem, cache=cache)
    removed, test_index = sample(problem, args)
    test = problem.test.subset(torch.as_tensor(test_index))
    subsets = args.part == "subsets"
    variants: dict[str, float | None]
    if subsets:
        response = SubsetsResponse(alphas=[args.alpha], subsets=args.subsets)
        weights = draw_masks(problem.n_train, (args.alpha,), args.subsets, 0)
        what = f"{args.subsets} subset refits (alpha {args.alpha})"
        variants = {"fidelity": None}

        def ours(processes: int, tolerance: float | None) -> tuple[np.ndarray, dict]:
            execution = Execution(workers=processes, cache=ArtifactCache(None))
            result = response.compute(trained, test, execution)
            return result.measured.T.numpy(), result.info

    else:
        weights = np.ones((len(removed), problem.n_train))
        weights[np.arange(len(removed)), removed] = 0.0
        what = f"{len(removed)} exact leave-one-out refits"
        variants = {"fidelity": None}
        for tolerance in args.refit_tolerance:
            variants[f"fidelity (tolerance {tolerance:g})"] = tolerance

        def ours(processes: int, tolerance: float | None) -> tuple[np.ndarray, dict]:
            execution = Execution(workers=processes, cache=ArtifactCache(None))
            cold = ColdResponse(tolerance=tolerance)
            result = cold.compute(trained, test, torch.as_tensor(removed), execution)
            return result.deltas.numpy(), result.info

    print(
        f"{args.problem}: {what}, {args.test_points} test points, p = {trained.n_params}, "
        f"N = {problem.n_train}, {args.rounds} alternating rounds; load average before "
        f"{os.getloadavg()}"
    )
    ours(1, None)  # warm-up: torch's first calls
    fulls = {solver: sklearn_full(problem, test_index, solver, 1e-10) for solver in SKLEARN_SOLVERS}
    times: dict[str, list[float]] = {}
    results: dict[str, np.ndarray] = {}
    infos: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, threads, processes in CONFIGURATIONS:
            torch.set_num_threads(threads)
            with threadpool_limits(threads):
                for variant, tolerance in variants.items():
                    start = time.perf_counter()
                    results[variant], infos[variant] = ours(processes, tolerance)
                    times.setdefault(f"{variant}, {name}", []).append(time.perf_counter() - start)
                for solver in SKLEARN_SOLVERS:
                    seconds, deltas = sklearn_refits(
                        problem, weights, test_index, solver, 1e-10, processes, fulls[solver]
                    )
                    times.setdefault(f"scikit-learn {solver}, {name}", []).append(seconds)
                    results[f"scikit-learn {solver}"] = deltas
    torch.set_num_threads(os.cpu_count() or 1)
    medians = {label: float(np.median(values)) for label, values in times.items()}
    for label, values in times.items():
        spread = np.array(values)
        print(
            f"  {label:<52} median {medians[label]:7.3f} s  "
            f"[{spread.min():.3f}, {spread.max():.3f}]"
        )

    def side(label: str) -> str:
        return label.rsplit(", ", 1)[0]

    def fastest(sides: list[str]) -> tuple[str, float]:
        return min(
            ((label, seconds) for label, seconds in medians.items() if side(label) in sides),
            key=lambda item: item[1],
        )

    floor = results["fidelity"]
    scale = np.abs(floor).max()
    error = {name: float(np.abs(deltas - floor).max() / scale) for name, deltas in results.items()}
    for name, value in error.items():
        print(f"  max |delta_{name} - delta_floor| / max |delta_floor|: {value:.2e}")
    sklearn_sides = [f"scikit-learn {solver}" for solver in SKLEARN_SOLVERS]
    peer_label, peer_seconds = fastest(sklearn_sides)
    ours_label, ours_seconds = fastest(["fidelity"])
    print(f"  best scikit-learn: {peer_label} {peer_seconds:.3f} s")
    print(f"  best fidelity (float floor): {ours_label} {ours_seconds:.3f} s")
    print(f"  ratio best / best: {peer_seconds / ours_seconds:.1f}x")
    if not subsets:
        peer_error = error[side(peer_label)]
        agreeing = [variant for variant in variants if error[variant] <= peer_error]
        equal_label, equal_seconds = fastest(agreeing)
        print(
            f"  at equal agreement (ours at most scikit-learn's {peer_error:.1e} from the floor): "
            f"{equal_label} {equal_seconds:.3f} s, ratio {peer_seconds / equal_seconds:.1f}x"
        )
        roofline(
            trained,
            len(removed),
            infos["fidelity"],
            ours_seconds,
            threads_of(ours_label),
        )
    print(f"  load average after {os.getloadavg()}")


def threads_of(label: str) -> int:
    return next(threads for name, threads, _ in CONFIGURATIONS if label.endswith(name))


def roofline(trained, removals: int, info: dict, seconds: float, threads: int) -> None:
    """Our refits' dominant arithmetic (the Hessian's symmetric blocks, then per model and
    step two GEMMs over the data and one product with P^{-1}) against a dense float64 GEMM's
    rate at the same threads. Where ``removal_base_inverse`` works in float32 (digits-logreg)
    the Hessian and the products with P^{-1} are float32 flops, counted here like float64 ones:
    the line is a rough bound on how far from the arithmetic the refits are, not a measurement
    of the BLAS."""
    form = affine_form(trained.model)
    if form is None:
        return
    k, c, n, p = form.out_features, form.columns, trained.problem.n_train, trained.n_params
    steps = removals * (info["mean_iterations"] + 1)
    flops = k * (k + 1) * c * c * n + steps * (4 * k * c * n + 2 * p * p)
    torch.set_num_threads(threads)
    size = 2000
    a = torch.randn(size, size, dtype=torch.float64)
    a @ a
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        a @ a
        rates.append(2 * size**3 / (time.perf_counter() - start))
    torch.set_num_threads(os.cpu_count() or 1)
    peak = max(rates)
    achieved = flops / seconds
    print(
        f"  roofline: about {flops / 1e9:.2f} GFLOP in {seconds:.3f} s = "
        f"{achieved / 1e9:.1f} GFLOP/s, {100 * achieved / peak:.0f}% of a {size}x{size} float64 "
        f"GEMM's {peak / 1e9:.1f} GFLOP/s at {threads} thread(s) "
        f"({info['mean_iterations']:.2f} steps per refit)"
    )


if __name__ == "__main__":
    main()
