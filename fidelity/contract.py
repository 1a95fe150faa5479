"""The estimator contract, checked (sklearn's ``check_estimator`` for fidelity's contract).

``check_estimator(cls_or_instance)`` raises a ``FidelityError`` with a one-line reason for the
first broken rule, in this order:

1. it is a subclass (or an instance) of ``fidelity.estimators.Estimator``;
2. ``__init__`` only configures: no fitted state (attributes ending in ``_``) before ``fit``;
3. ``get_params()`` is a dict of the constructor's arguments that builds an equal estimator;
4. on the contract problem (a float64 ridge regression, ``contract_problem()``), ``fit``
   returns ``self``;
5. ``scores(test, train)`` is a floating tensor ``[n_test, n_train]`` of finite values;
6. it mutates nothing: the parameters theta_s, the model's state and the data are unchanged
   after fit and scores (checked again at the end);
7. its sign follows DESIGN.md: the scores correlate positively (Pearson > 0) with the closed-form
   removal influence ``(1/N) g_t^T H^-1 g_j`` of the ridge problem (positive when removing j
   raises t's loss). This is a sign test, not an accuracy test: how well an estimator tracks
   retraining is what fidelity measures;
8. it is deterministic: a second estimator built from the same parameters and fitted again gives
   the same scores;
9. rows follow the test points and columns the training points: the scores of a subset of
   each equal the full matrix's rows and columns.

``fidelity run`` checks every estimator class a suite names by import path (other than
fidelity's own) before any compute; an entry with ``contract = false`` is checked for rules 1-3
only (for a class whose settings only fit the user's own model).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from functools import cache, partial
from typing import Any, NoReturn

import numpy as np
import torch

from fidelity.core.errors import FidelityError, user_code
from fidelity.core.problem import MinibatchRecipe, NewtonRecipe, Problem, TrainedProblem
from fidelity.estimators import Estimator
from fidelity.problems.models import linear_model
from fidelity.retrain import train

#: Determinism and subset agreement allow only round-off.
AGREEMENT_RTOL = 1e-9
AGREEMENT_ATOL = 1e-14


def contract_problem(seed: int = 0) -> Problem:
    """A 3-feature ridge regression (24 training and 6 test points, weight decay 0.1, float64),
    whose removal influence has a closed form (``closed_form_influence``)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    weights = torch.tensor([[1.5], [-2.0], [0.5]], dtype=torch.float64)
    y = x @ weights + 0.5 * torch.randn(30, 1, generator=generator, dtype=torch.float64)
    return Problem(
        name="contract-ridge",
        x_train=x[:24],
        y_train=y[:24],
        x_test=x[24:],
        y_test=y[24:],
        model_factory=partial(linear_model, 3, 1),
        loss="mse",
        weight_decay=0.1,
        recipe=NewtonRecipe(),
    )


#: How the contract problem is trained for estimators that follow the training run: full-batch
#: gradient descent long enough to reach the ridge optimum, whose closed-form influence the
#: scores must then track.
PATH_RECIPE = MinibatchRecipe(
    optimizer="sgd", learning_rate=0.1, momentum=0.5, epochs=300, batch_size=24
)


@cache
def _trained_contract_problem(training_path: bool = False) -> TrainedProblem:
    problem = contract_problem()
    if training_path:
        problem = dataclasses.replace(problem, recipe=PATH_RECIPE)
    return train(problem)


def closed_form_influence(problem: Problem) -> np.ndarray:
    """``[n_test, n_train]`` removal influence of a ridge problem with a bias (half squared
    error, weight decay on every parameter): with A = X^T X + N wd I (so H = A / N) and
    g = x (x^T theta - y), delta[t, j] = g_t^T A^-1 g_j."""
    design = np.c_[problem.x_train.numpy(), np.ones(problem.n_train)]
    test_design = np.c_[problem.x_test.numpy(), np.ones(problem.n_test)]
    n, p = design.shape
    system = design.T @ design + n * problem.weight_decay * np.eye(p)
    theta = np.linalg.solve(system, design.T @ problem.y_train.numpy()[:, 0])
    train_grads = design * (design @ theta - problem.y_train.numpy()[:, 0])[:, None]
    test_grads = test_design * (test_design @ theta - problem.y_test.numpy()[:, 0])[:, None]
    return test_grads @ np.linalg.solve(system, train_grads.T)


def check_estimator(
    estimator: type[Estimator] | Estimator,
    settings: Mapping[str, Any] | None = None,
    *,
    numeric: bool = True,
) -> None:
    """Check the contract (module docstring) for a class built with ``settings`` or for an
    instance; ``numeric=False`` checks rules 1-3 only. Raises ``FidelityError`` naming the
    first broken rule; returns None when every rule holds."""
    if isinstance(estimator, type):
        cls = estimator
        name = f"{cls.__module__}.{cls.__qualname__}"
        _check_subclass(cls, name)
        instance = _build(cls, dict(settings or {}), name)
    else:
        cls = type(estimator)
        name = f"{cls.__module__}.{cls.__qualname__}"
        _check_subclass(cls, name)
        instance = estimator
    fitted = [a for a in vars(instance) if a.endswith("_") and not a.startswith("_")]
    if fitted:
        _broken(name, f"__init__ sets fitted state {', '.join(fitted)} (only fit may)")
    params = _params(instance, name)
    if not numeric:
        return
    trained = _trained_contract_problem(cls.training_path)
    problem = trained.problem
    before = _snapshot(trained)
    result = _call(name, "fit", lambda: instance.fit(trained))
    if result is not instance:
        _broken(name, f"fit() returned {type(result).__name__}, not self")
    full = _scores(instance, name, problem.test, problem.train, (problem.n_test, problem.n_train))
    _check_unchanged(trained, before, name)
    expected = closed_form_influence(problem)
    correlation = float(np.corrcoef(full.ravel(), expected.ravel())[0, 1])
    if not correlation > 0:
        _broken(
            name,
            f"its scores correlate {correlation:+.3f} with the closed-form removal influence of "
            "the contract problem: the sign is flipped or the scores are unrelated (DESIGN.md: "
            "positive when removing a point raises the test loss)",
        )
    again = _build(cls, params, name)
    _call(name, "fit", lambda: again.fit(trained))
    repeat = _scores(again, name, problem.test, problem.train, full.shape)
    if not np.allclose(repeat, full, rtol=AGREEMENT_RTOL, atol=AGREEMENT_ATOL):
        _broken(name, "it is not deterministic: a second fit with the same parameters differs")
    rows, cols = torch.tensor([4, 1]), torch.tensor([9, 0, 17])
    part = _scores(instance, name, problem.test.subset(rows), problem.train.subset(cols), (2, 3))
    if not np.allclose(part, full[rows][:, cols], rtol=AGREEMENT_RTOL, atol=AGREEMENT_ATOL):
        _broken(
            name,
            "scores of a subset of test and training points differ from the full matrix's rows "
            "and columns (rows must follow test points, columns training points)",
        )
    _check_unchanged(trained, before, name)


def _check_unchanged(trained: TrainedProblem, before: dict[str, Any], name: str) -> None:
    changed = [what for what, value in _snapshot(trained).items() if not _same(value, before[what])]
    if changed:
        _trained_contract_problem.cache_clear()  # never hand the damaged problem on
        _broken(name, f"fit or scores changed {', '.join(changed)}")


def _broken(name: str, reason: str) -> NoReturn:
    raise FidelityError(f"estimator {name} breaks the estimator contract: {reason}")


def _check_subclass(cls: type, name: str) -> None:
    if not issubclass(cls, Estimator):
        _broken(name, "it does not subclass fidelity.estimators.Estimator")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        _broken(name, f"it leaves {missing} abstract")


def _build(cls: type[Estimator], settings: dict[str, Any], name: str) -> Estimator:
    return _call(name, "its constructor", lambda: cls(**settings))


def _call(name: str, what: str, function: Any) -> Any:
    try:
        with user_code(f"{what} raised"):
            return function()
    except FidelityError as exc:
        _broken(name, str(exc))


def _params(instance: Estimator, name: str) -> dict[str, Any]:
    params = _call(name, "get_params()", instance.get_params)
    if not isinstance(params, dict):
        _broken(name, f"get_params() returned {type(params).__name__}, not a dict")
    rebuilt = _build(type(instance), params, name)
    again = _call(name, "get_params()", rebuilt.get_params)
    if again != params:
        _broken(name, "get_params() does not round-trip through the constructor")
    return params


def _scores(instance: Estimator, name: str, test, train, shape: tuple[int, int]) -> np.ndarray:
    values = _call(name, "scores()", lambda: instance.scores(test, train))
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        _broken(name, f"scores() returned {type(values).__name__}, not a floating torch.Tensor")
    if tuple(values.shape) != tuple(shape):
        _broken(
            name,
            f"scores() returned shape {tuple(values.shape)} for {shape[0]} test and {shape[1]} "
            "training points; expected [n_test, n_train]",
        )
    array = values.detach().cpu().double().numpy()
    if not np.isfinite(array).all():
        _broken(name, "scores() returned NaN or infinite values")
    return array


def _snapshot(trained: TrainedProblem) -> dict[str, Any]:
    problem = trained.problem
    return {
        "theta_s": trained.theta.detach().clone(),
        "the model's state": {k: v.clone() for k, v in trained.model.module.state_dict().items()},
        "the training data": (problem.x_train.clone(), problem.y_train.clone()),
        "the test data": (problem.x_test.clone(), problem.y_test.clone()),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(torch.equal(a, b))
