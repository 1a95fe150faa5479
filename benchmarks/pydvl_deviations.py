"""The size of pyDVL 0.10's deviations on the 38-parameter MLP of the adapter tests
(``tests/estimators/test_pydvl.py`` asserts their exact form; this prints how large they are).

- EK-FAC and K-FAC (``update_diagonal`` false) against our ``ekfac``/``kfac`` with the expected
  Fisher at the same damping: Pearson and max relative difference;
- CG and Arnoldi (rank p) in Hessian mode with loader batches of 7 (30 points: a smaller last
  batch) and of 10 (equal batches): max relative difference from our ``exact``.

    bash benchmarks/peers_env.sh
    .peers-venv/bin/python -m benchmarks.pydvl_deviations
"""

from __future__ import annotations

import warnings

from fidelity.estimators import EkfacEstimator, ExactEstimator, KfacEstimator
from fidelity.estimators.external.pydvl import PydvlEstimator
from fidelity.metrics import pearson
from fidelity.retrain import train
from tests.conftest import make_tiny_mlp_problem
from tests.estimators.references import relative_error

DAMPING = 0.1


def main() -> None:
    warnings.simplefilter("ignore")
    trained = train(make_tiny_mlp_problem("cross_entropy"))
    problem = trained.problem

    def scores(estimator):
        return estimator.fit(trained).scores(problem.test, problem.train)

    print(f"MLP with {trained.n_params} parameters, {problem.n_train} training points")
    for update_diagonal, ours in ((True, EkfacEstimator), (False, KfacEstimator)):
        expected = scores(ours(damping=DAMPING, fisher="expected"))
        actual = scores(
            PydvlEstimator(solver="ekfac", damping=DAMPING, update_diagonal=update_diagonal)
        )
        print(
            f"pyDVL {'EK-FAC' if update_diagonal else 'K-FAC '} vs our {ours.name} (expected "
            f"Fisher): Pearson {pearson(actual.flatten().numpy(), expected.flatten().numpy()):.4f}"
            f", max relative difference {relative_error(actual, expected):.3g}"
        )
    exact = scores(ExactEstimator(damping=DAMPING))
    for solver, options in (("cg", {"tol": 1e-12}), ("arnoldi", {"rank": trained.n_params})):
        for batch_size in (7, 10):
            actual = scores(
                PydvlEstimator(solver=solver, damping=DAMPING, batch_size=batch_size, **options)
            )
            print(
                f"pyDVL {solver} batches of {batch_size}: max relative difference from exact "
                f"{relative_error(actual, exact):.3g}"
            )


if __name__ == "__main__":
    main()
