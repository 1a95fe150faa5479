"""Throughput of exact leave-one-out refits on digits-logreg: fidelity's `cold` vs scikit-learn.

Both solve the same objective, J_{-j} = (1/N) sum_{i != j} L_i + (wd/2) ||theta||^2 with the bias
penalised like every weight: scikit-learn gets a constant feature instead of an intercept,
C = 1/(N wd), and sample weight 0 for the removed point (so the 1/N is unchanged), warm-started
from theta_s with tol 1e-10. Prints both times, their ratio and the largest difference between
the two sets of deltas relative to the largest delta.

    python -m benchmarks.retrain_throughput [--removals 100] [--workers 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fidelity.problems import load_problem
from retrain import ColdResponse, Execution, train


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--removals", type=int, default=100)
    parser.add_argument("--test-points", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    problem = load_problem("digits-logreg")
    trained = train(problem)
    rng = np.random.default_rng(0)
    removed = np.sort(rng.choice(problem.n_train, args.removals, replace=False))
    test_index = np.sort(rng.choice(problem.n_test, args.test_points, replace=False))
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
