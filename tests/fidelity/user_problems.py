"""Problems importable by path, as a user's package would provide them."""

import torch

from tests.conftest import make_tiny_logreg


def tiny() -> object:
    return make_tiny_logreg()


def with_nan() -> object:
    problem = make_tiny_logreg()
    x_test = problem.x_test.clone()
    x_test[0, 0] = float("nan")
    return type(problem)(**{**vars(problem), "x_test": x_test})


def not_a_problem() -> object:
    return {"x": torch.zeros(3)}


def broken() -> object:
    raise RuntimeError("cannot reach the data")


def tiny_network() -> object:
    """A tiny MLP trained by minibatch SGD (non-convex, seed-dependent)."""
    from fidelity.problem import MinibatchRecipe
    from tests.conftest import make_tiny_mlp_problem

    problem = make_tiny_mlp_problem("cross_entropy", n_train=30)
    recipe = MinibatchRecipe(optimizer="sgd", learning_rate=0.1, epochs=20, batch_size=8)
    return type(problem)(**{**vars(problem), "recipe": recipe})
