"""Perturbation influence (Koh & Liang 2017's third use of influence) validated against
retraining, and the training-set attack it guides.

The estimand (``InverseCurvatureEstimator.perturbation_gradients``): d m(z_t) / d x_j, the
first-order change of test point t's loss per unit change of training input x_j. Moving x_j by
eps v changes the loss by eps <gradient, v> to first order; the ground truth retrains with the
moved input (``fidelity.retrain.perturbation``). On the text problems the inputs are the
encoder's features (a sentence embedding, or the hidden states entering the last block), so a
perturbation moves a point in that feature space, not a word of its sentence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from fidelity.applications.common import check_classification, labels, predictions, summary
from fidelity.core.errors import FidelityError
from fidelity.core.problem import (
    Examples,
    MinibatchRecipe,
    NewtonRecipe,
    Problem,
    TrainedProblem,
)
from fidelity.estimators import Estimator, perturbation_effects
from fidelity.retrain import Execution
from fidelity.retrain.perturbation import (
    breakdown,
    data_range,
    retrain_perturbed,
    unit_rows,
)

DEFAULT_EPS = (0.001, 0.01, 0.1, 0.3, 1.0)


def input_space(trained: TrainedProblem) -> str:
    """What a perturbation moves, said plainly."""
    if trained.problem.train_texts is not None:
        return (
            "the encoder's features of each sentence (the model's input), not its words: a "
            "perturbation moves a point in that feature space"
        )
    return "the model's input"


def check_eps(eps: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(e) for e in eps)
    if not values or any(not (e > 0 and math.isfinite(e)) for e in values):
        raise FidelityError(f"eps must be positive numbers, got {list(eps)}")
    return tuple(sorted(set(values)))


def gradients_of(estimator: Estimator, test: Examples, train: Examples, chunk: int = 512) -> Tensor:
    """``perturbation_gradients`` of ``estimator``, over the training set in chunks (the result
    is ``[n_test, n_train, *input]``); an estimator without the estimand is a one-line error."""
    compute = getattr(estimator, "perturbation_gradients", None)
    if compute is None:
        raise FidelityError(
            f"estimator {estimator.name!r} has no perturbation influence (the inverse-curvature "
            "estimators have: exact, gnh, cg, lissa, arnoldi, kfac, ekfac, grad-dot)"
        )
    parts = [
        compute(test, Examples(train.x[s : s + chunk], train.y[s : s + chunk]))
        for s in range(0, len(train), chunk)
    ]
    return torch.cat(parts, dim=1).detach()


def perturbation_agreement(
    trained: TrainedProblem,
    estimator: Estimator,
    *,
    test_points: int = 10,
    train_points: int = 10,
    eps: Sequence[float] = DEFAULT_EPS,
    seed: int = 0,
    execution: Execution | None = None,
    label: str | None = None,
) -> dict[str, object]:
    """Predicted against retrained changes of the test losses when single training inputs move.

    ``test_points`` test points drawn with ``seed``; the ``train_points`` training points whose
    inputs move those test losses most to first order (largest summed norm of the perturbation
    gradient); for each, two unit (L2) directions: a random one (Gaussian, drawn with ``seed``)
    and the predicted worst one (the gradient of the summed test losses in that input). For each
    step size in ``eps`` each point is retrained with its input moved by eps v, and the actual
    changes of every test loss are compared with eps <gradient, v>: Pearson, the slope of actual
    on predicted (least squares through the origin: 1 when the first-order prediction is right
    in scale), the relative error, and the eps where the prediction breaks down (Pearson below
    0.9 or the slope off by more than 10%). ``label`` names the estimator in the result
    (default: its kind).
    """
    problem = trained.problem
    eps = check_eps(eps)
    if not 1 <= test_points <= problem.n_test or not 1 <= train_points <= problem.n_train:
        raise FidelityError(
            f"test_points must lie in [1, {problem.n_test}] and train_points in "
            f"[1, {problem.n_train}]"
        )
    generator = torch.Generator().manual_seed(seed)
    test_index = torch.sort(torch.randperm(problem.n_test, generator=generator)[:test_points])[0]
    test = problem.test.subset(test_index.to(problem.device))
    everything = gradients_of(estimator, test, problem.train)  # [T, N, *input]
    sensitivity = everything.flatten(2).norm(dim=2).sum(0)
    chosen = torch.topk(sensitivity.cpu(), train_points).indices.sort()[0]
    gradients = everything[:, chosen.to(everything.device)]  # [T, K, *input]
    shape = gradients.shape[2:]
    random = torch.randn(train_points, *shape, generator=generator, dtype=gradients.dtype)
    directions = {
        "random": unit_rows(random.to(gradients.device)),
        "worst": unit_rows(gradients.sum(0)),
    }
    rows = []
    for kind, direction in directions.items():
        first_order = perturbation_effects(gradients, direction)  # [T, K], per unit eps
        pearsons, slopes = [], []
        for size in eps:
            actual = retrain_perturbed(
                trained, test, chosen, size * direction, execution
            ).changes.T  # [T, K]
            predicted = size * first_order
            p, a = predicted.flatten().double(), actual.flatten().double()
            pearson = float(torch.corrcoef(torch.stack([p, a]))[0, 1])
            slope = float((a @ p) / (p @ p)) if float(p @ p) > 0 else float("nan")
            rows.append(
                {
                    "direction": kind,
                    "eps": size,
                    "pearson": pearson,
                    "slope": slope,
                    "relative_error": float((a - p).norm() / a.norm()) if a.norm() > 0 else None,
                    "mean_abs_actual": float(a.abs().mean()),
                }
            )
            pearsons.append(pearson)
            slopes.append(slope)
        rows[-len(eps)]["breaks_down_at"] = breakdown(
            np.array(eps), np.array(pearsons), np.array(slopes)
        )
    return {
        "application": "perturb",
        "problem": problem.name,
        "estimator": label or estimator.name,
        "input_space": input_space(trained),
        "test_index": test_index.tolist(),
        "train_index": chosen.tolist(),
        "eps": list(eps),
        "seed": seed,
        "rows": rows,
    }


#: How many attacked points the result keeps for the figure.
SHOWN = 6


def attack(
    trained: TrainedProblem,
    estimator: Estimator,
    *,
    test_points: int = 20,
    budget: float = 0.1,
    steps: int = 10,
    seed: int = 0,
    value_range: tuple[float, float] | None = None,
    execution: Execution | None = None,
    label: str | None = None,
) -> dict[str, object]:
    """Koh & Liang's training-set attack: for each of ``test_points`` correctly classified test
    points (drawn with ``seed``), move ONE training input within an L-infinity ``budget`` (and
    inside ``value_range``, default the training inputs' own range: [0, 1] for digits) to raise
    that test point's loss, retrain, and count the flipped predictions.

    The attacked point is the training point whose input moves the test loss most under an
    L-infinity step (largest L1 norm of the perturbation gradient). The attack takes ``steps``
    projected signed-gradient steps of size 2.5 budget / steps (iterative FGSM); on a Newton
    problem each step retrains exactly and refits the estimator there, so the gradient follows
    the moved model; on a minibatch problem the steps use the gradient at theta_s (retraining a
    network per step is the cost of a run) and only the final input is retrained. Baselines of
    the same size: the same point moved by a random sign vector, and the point of largest
    removal influence |delta_hat[t, j]| moved by a random sign vector. Flip rates carry a 95%
    Wilson interval over the attacked test points; loss changes a Student-t interval.
    ``label`` names the estimator in the result (default: its kind).
    """
    problem = trained.problem
    check_classification(problem, "attack")
    if not (budget > 0 and math.isfinite(budget)):
        raise FidelityError(f"budget must be a positive number, got {budget!r}")
    if steps < 1:
        raise FidelityError(f"steps must be >= 1, got {steps}")
    low, high = value_range if value_range is not None else data_range(trained)
    if not low < high:
        raise FidelityError(f"the value range must have low < high, got [{low:g}, {high:g}]")
    if budget > high - low:
        raise FidelityError(
            f"budget {budget:g} exceeds the width of the data range [{low:g}, {high:g}]: "
            "every input could be moved anywhere; give a smaller budget"
        )
    if not torch.is_floating_point(problem.x_train):
        raise FidelityError(
            f"the inputs of {problem.name!r} are {problem.x_train.dtype}: an attack needs "
            "floating-point inputs"
        )
    execution = execution or Execution()
    generator = torch.Generator().manual_seed(seed)
    correct = torch.nonzero(
        predictions(trained, problem.test) == labels(problem, problem.test)
    ).flatten()
    if len(correct) == 0:
        raise FidelityError(
            f"{problem.name!r} classifies no test point correctly: nothing to attack"
        )
    order = correct[torch.randperm(len(correct), generator=generator)]
    attacked = order[: min(test_points, len(correct))].sort()[0]
    newton = isinstance(problem.recipe, NewtonRecipe)
    size = 2.5 * budget / steps
    methods: dict[str, list[tuple[int, Tensor]]] = {
        "attack": [],
        "random signs, same point": [],
        "random signs, most influential point": [],
    }
    for t in attacked.tolist():
        point = problem.test.subset(torch.tensor([t], device=problem.device))
        gradient = gradients_of(estimator, point, problem.train)[0]  # [N, *input]
        j = int(gradient.flatten(1).abs().sum(1).argmax())
        original = problem.x_train[j]
        floor = torch.clamp(original - budget, min=low)
        ceiling = torch.clamp(original + budget, max=high)
        moved = original.clone()
        current_gradient = gradient[j]
        for number in range(steps):
            if newton and number > 0:
                # follow the moved model: refit exactly, then refit the estimator there
                refit = retrain_perturbed(
                    trained, point, torch.tensor([j]), (moved - original).unsqueeze(0), execution
                )
                current = TrainedProblem(
                    _with_input(problem, j, moved), trained.model, refit.thetas[0].to(trained.theta)
                )
                estimator.fit(current)
                current_gradient = gradients_of(
                    estimator, point, Examples(moved.unsqueeze(0), problem.y_train[j : j + 1])
                )[0, 0]
            moved = torch.clamp(moved + size * current_gradient.sign(), floor, ceiling)
        if newton and steps > 1:
            estimator.fit(trained)  # back at theta_s for the baselines and the next test point
        methods["attack"].append((j, moved - original))
        signs = torch.randint(0, 2, original.shape, generator=generator).to(original) * 2 - 1
        methods["random signs, same point"].append((j, _boxed(original, signs * budget, low, high)))
        removal = estimator.scores(point, problem.train)[0]
        influential = int(removal.abs().argmax())
        signs = torch.randint(0, 2, original.shape, generator=generator).to(original) * 2 - 1
        methods["random signs, most influential point"].append(
            (
                influential,
                _boxed(problem.x_train[influential], signs * budget, low, high),
            )
        )
    outcomes: dict[str, dict[str, object]] = {}
    shown = []
    train_labels = labels(problem, problem.train)
    attacked_test = problem.test.subset(attacked.to(problem.device))
    truth = labels(problem, attacked_test)
    for name, moves in methods.items():
        index = torch.tensor([j for j, _ in moves])
        steps_taken = torch.stack([move for _, move in moves])
        retrained = retrain_perturbed(trained, attacked_test, index, steps_taken, execution)
        flipped, changes = [], []
        for k in range(len(moves)):
            moved_model = TrainedProblem(
                problem, trained.model, retrained.thetas[k].to(trained.theta)
            )
            own = attacked_test.subset(torch.tensor([k], device=problem.device))
            flipped.append(bool(predictions(moved_model, own)[0] != truth[k]))
            changes.append(float(retrained.changes[k, k]))
        outcomes[name] = {
            "flip_rate": _wilson(sum(flipped), len(flipped)),
            "flipped": sum(flipped),
            "loss_change": summary(changes),
            "largest_step": float(steps_taken.abs().max()),
        }
        if name == "attack":
            # the flipped ones first, then those whose loss rose most
            ranked = sorted(range(len(moves)), key=lambda k: (not flipped[k], -changes[k]))
            for k in ranked[:SHOWN]:
                j, move = moves[k]
                shown.append(
                    {
                        "test_index": int(attacked[k]),
                        "train_index": j,
                        "flipped": flipped[k],
                        "loss_change": changes[k],
                        "test_label": int(truth[k]),
                        "train_label": int(train_labels[j]),
                        "original": problem.x_train[j].flatten().tolist(),
                        "perturbed": (problem.x_train[j] + move).flatten().tolist(),
                        "test_input": problem.test.x[int(attacked[k])].flatten().tolist(),
                    }
                )
    return {
        "application": "attack",
        "problem": problem.name,
        "estimator": label or estimator.name,
        "input_space": input_space(trained),
        "input_shape": list(problem.x_train.shape[1:]),
        "test_index": attacked.tolist(),
        "budget": budget,
        "steps": steps,
        "value_range": [low, high],
        "seed": seed,
        "refit_per_step": newton,
        "minibatch": isinstance(problem.recipe, MinibatchRecipe),
        "outcomes": outcomes,
        "shown": shown,
    }


def _with_input(problem: Problem, index: int, value: Tensor) -> Problem:
    """The problem with training input ``index`` replaced by ``value``."""
    x = problem.x_train.clone()
    x[index] = value
    return dataclasses.replace(problem, x_train=x)


def _boxed(original: Tensor, step: Tensor, low: float, high: float) -> Tensor:
    """``step`` cut back so that ``original + step`` stays in [low, high]."""
    return torch.clamp(original + step, low, high) - original


def _wilson(successes: int, trials: int, z: float = 1.959963984540054) -> dict[str, float | None]:
    """The proportion with its Wilson score interval (95% by default)."""
    if trials == 0:
        return {"value": None, "low": None, "high": None}
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = (
        z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    )
    # At 0 or all successes the bound is exactly 0 or 1; the formula leaves round-off there.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return {"value": p, "low": low, "high": high}
