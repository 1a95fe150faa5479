"""Label-flip poisoning guided by influence (the seed study's attack)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fidelity.applications.common import (
    accuracy,
    against_baseline,
    check_classification,
    flip_labels,
    labels,
    predictions,
    summary,
)
from fidelity.core.errors import FidelityError
from fidelity.core.objective import per_example_loss
from fidelity.core.problem import NewtonRecipe, TrainedProblem
from fidelity.estimators import Estimator
from fidelity.retrain import seeded_variant, train


def poison(
    trained: TrainedProblem,
    estimators: Mapping[str, Estimator],
    *,
    budget: int,
    seeds: Sequence[int] = (0, 1, 2),
    cache=None,
) -> dict[str, object]:
    """Flip the labels of ``budget`` training points and retrain; report test accuracy.

    Each estimator chooses the points most helpful to the test points the model classifies
    correctly: the largest sum over those test points of delta_hat[t, j] (removing j would raise
    their losses most). Baselines: ``budget`` random points (drawn per seed) and the ``budget``
    points of highest training loss. The attacked model is retrained from scratch with each of
    ``seeds`` (initialisation and batch order; the seed of the problem's own recipe is the first);
    for a convex problem trained to its unique minimum only the random choice depends on the
    seed. Accuracies are over the whole test split, before and after, with Student-t intervals
    over seeds; ``drop_beyond_random`` is each choice's accuracy loss beyond the random flips'
    of the same seed, with its interval and a paired t-test.
    """

    problem = trained.problem
    check_classification(problem, "poison")
    if not 1 <= budget < problem.n_train:
        raise FidelityError(f"budget must lie in [1, {problem.n_train}), got {budget}")
    if not seeds:
        raise FidelityError("poison needs at least one seed")
    test = problem.test
    correct = torch.nonzero(predictions(trained, test) == labels(problem, test)).flatten()
    chosen: dict[str, torch.Tensor] = {}
    for name, estimator in estimators.items():
        helpfulness = torch.zeros(problem.n_train, dtype=problem.dtype)
        for start in range(0, len(correct), 256):
            part = test.subset(correct[start : start + 256].to(problem.device))
            helpfulness += estimator.scores(part, problem.train).sum(0).detach().cpu()
        chosen[name] = torch.topk(helpfulness, budget).indices
    losses = per_example_loss(trained.model, problem.loss, trained.theta, problem.train)
    chosen["highest loss"] = torch.topk(losses.detach().cpu(), budget).indices

    deterministic = isinstance(problem.recipe, NewtonRecipe)
    # A convex refit of the same flips is the same model whatever the seed: such an accuracy is
    # measured once (one value, no interval) rather than repeated into a zero-width interval.
    # Multiclass flips draw the new class from the seed, so those are retrained per seed.
    seed_free = deterministic and problem.loss == "bce"
    before: list[float] = []
    after: dict[str, list[float]] = {name: [] for name in [*chosen, "random"]}
    for seed in seeds:
        variant = problem if deterministic else seeded_variant(problem, seed)
        generator = torch.Generator().manual_seed(int(seed))
        if not (deterministic and before):
            model = trained if (deterministic or seed == 0) else train(variant, cache=cache)
            before.append(accuracy(model, test))
        random_choice = torch.randperm(problem.n_train, generator=generator)[:budget]
        for name, index in {**chosen, "random": random_choice}.items():
            if seed_free and name != "random" and after[name]:
                continue
            attacked = train(flip_labels(variant, index, generator), cache=cache)
            after[name].append(accuracy(attacked, test))
    return {
        "application": "poison",
        "problem": problem.name,
        "budget": budget,
        "fraction": budget / problem.n_train,
        "seeds": [int(s) for s in seeds],
        "deterministic_training": deterministic,
        "correct_test_points": len(correct),
        "accuracy_before": summary(before),
        "accuracy_after": {name: summary(values) for name, values in after.items()},
        # Accuracy lost beyond what flipping `budget` random labels loses, seed by seed
        # (positive: the ranking's flips hurt more than random ones).
        "drop_beyond_random": {
            name: against_baseline(after["random"], values)
            for name, values in after.items()
            if name != "random"
        },
        "flipped": {name: index.tolist() for name, index in chosen.items()},
    }
