"""Retraining throughput: exact refits against scikit-learn, vmapped groups against one model
at a time, and worker scaling.

``--part convex`` (digits-logreg): fidelity's `cold` against scikit-learn. Both solve the same
objective, J_{-j} = (1/N) sum_{i != j} L_i + (wd/2) ||theta||^2 with the bias penalised like
every weight: scikit-learn gets a constant feature instead of an intercept, C = 1/(N wd), and
sample weight 0 for the removed point (so the 1/N is unchanged), warm-started from theta_s with
tol 1e-10. Prints both times, their ratio and the largest difference between
the two sets of deltas relative to the largest delta.

``--part warm`` (digits-mlp): the `warm` stage for ``--removals`` removals trained in vmapped
groups (``--group-size``, default 128: one group) against the same stage with groups of one (one
model at a time), in the same process, after an untimed warm-up; prints both times, the ratio
and the largest difference between the deltas.

``--part workers`` (digits-mlp): the `cold` stage (groups of 25) with 1 and with 2 loky
workers; prints both times and the ratio.

    python -m benchmarks.retrain_throughput [--part all] [--removals 100] [--workers 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fidelity.problems import load_problem
from fidelity.retrain import ColdResponse, Execution, WarmResponse, train


def sklearn_refits(problem, removed: np.ndarray, test_index: np.ndarray, tol: float):
    from sklearn.linear_model import LogisticRegression

    x = np.hstack([problem.x_train.numpy(), np.ones((problem.n_train, 1))])
    y = problem.y_train.numpy()
    x_test = np.hstack([problem.x_test.numpy(), np.ones((problem.n_test, 1))])[test_index]
    y_test = problem.y_test.numpy()[test_index]
    c = 1.0 / (problem.n_train * problem.weight_decay)
    model = LogisticRegression(C=c, fit_intercept=False, tol=tol, max_iter=100_000)
    model.fit(x, y)
    base = -model.predict_log_proba(x_test)[np.arange(len(y_test)), y_test]
    full_coef = model.coef_.copy()
    model.set_params(warm_start=True)
    deltas = np.empty((len(test_index), len(removed)))
    start = time.perf_counter()
    for column, j in enumerate(removed):
        model.coef_ = full_coef.copy()  # every refit warm-starts from theta_s, like ours
        weights = np.ones(problem.n_train)
        weights[j] = 0.0
        model.fit(x, y, sample_weight=weights)
        loss = -model.predict_log_proba(x_test)[np.arange(len(y_test)), y_test]
        deltas[:, column] = loss - base
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
    parser.add_argument("--part", choices=["all", "convex", "warm", "workers"], default="all")
    parser.add_argument("--removals", type=int, default=100)
    parser.add_argument("--test-points", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="workers for --part convex")
    parser.add_argument("--warm-epochs", type=int, default=20)
    parser.add_argument("--group-size", type=int, default=128, help="warm group size")
    args = parser.parse_args()
    if args.part in ("all", "convex"):
        convex_refits(args)
    if args.part in ("all", "warm"):
        warm_groups(args)
    if args.part in ("all", "workers"):
        cold_workers(args)


def convex_refits(args) -> None:
    problem = load_problem("digits-logreg")
    trained = train(problem)
    removed, test_index = sample(problem, args)
    test = problem.test.subset(torch.as_tensor(test_index))

    start = time.perf_counter()
    ours = ColdResponse().compute(
        trained, test, torch.as_tensor(removed), Execution(workers=args.workers)
    )
    ours_seconds = time.perf_counter() - start
    theirs_seconds, theirs = sklearn_refits(problem, removed, test_index, tol=1e-10)

    deltas = ours.deltas.numpy()
    scale = np.abs(deltas).max()
    print(
        f"digits-logreg: {args.removals} exact leave-one-out refits, "
        f"{args.test_points} test points, torch threads {torch.get_num_threads()}"
    )
    print(
        f"  fidelity cold (workers={args.workers}): {ours_seconds:8.2f} s "
        f"(mean {ours.info['mean_iterations']:.1f} iterations, "
        f"max gradient norm {ours.info['max_grad_norm']:.1e})"
    )
    print(f"  scikit-learn LogisticRegression loop: {theirs_seconds:8.2f} s")
    print(f"  speed-up: {theirs_seconds / ours_seconds:.1f}x")
    print(
        f"  max |delta_ours - delta_sklearn| / max |delta|: "
        f"{np.abs(deltas - theirs).max() / scale:.2e}"
    )
    print(f"  Pearson(ours, sklearn): {np.corrcoef(deltas.ravel(), theirs.ravel())[0, 1]:.8f}")


if __name__ == "__main__":
    main()
