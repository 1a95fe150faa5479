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
    from fidelity.core.problem import MinibatchRecipe
    from tests.conftest import make_tiny_mlp_problem

    problem = make_tiny_mlp_problem("cross_entropy", n_train=30)
    recipe = MinibatchRecipe(optimizer="sgd", learning_rate=0.1, epochs=20, batch_size=8)
    return type(problem)(**{**vars(problem), "recipe": recipe})


def tiny_text_problem() -> object:
    """40 short seeded 'reviews' (bag of words over a small vocabulary), logistic regression,
    with their texts: a text problem that needs no encoder."""
    import numpy as np
    import torch

    from fidelity.core.problem import Problem
    from fidelity.problems.models import linear_model

    rng = np.random.default_rng(0)
    positive = ["great", "moving", "funny", "smart", "<b>bold</b>"]
    negative = ["dull", "flat", "tedious", "messy", "<script>alert(1)</script>"]
    neutral = ["film", "plot", "cast", "story", "ending"]
    vocabulary = positive + negative + neutral
    texts, labels = [], []
    for _ in range(48):
        label = int(rng.integers(2))
        pool = positive if label else negative
        words = list(rng.choice(pool, 2)) + list(rng.choice(neutral, 2)) + [rng.choice(vocabulary)]
        texts.append(" ".join(rng.permutation(words)))
        labels.append(label)
    counts = np.array([[text.split().count(word) for word in vocabulary] for text in texts])
    x = torch.tensor(counts, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64).reshape(-1, 1)
    return Problem(
        name="tiny-text",
        x_train=x[:40],
        y_train=y[:40],
        x_test=x[40:],
        y_test=y[40:],
        model_factory=lambda: linear_model(len(vocabulary), 1),
        loss="bce",
        weight_decay=1e-2,
        train_texts=tuple(texts[:40]),
        test_texts=tuple(texts[40:]),
    )


def markup_text_problem() -> object:
    """``tiny_text_problem`` whose training texts carry markup that a report must not run."""
    problem = tiny_text_problem()
    texts = tuple(
        f'{text} <script>alert(1)</script> <img src=x onerror="alert(2)">'
        for text in problem.train_texts
    )
    return type(problem)(**{**vars(problem), "name": "markup-text", "train_texts": texts})


def cache_probe(cache=None) -> object:
    """The tiny problem, its description naming the cache it was given."""
    from dataclasses import replace

    root = None if cache is None else cache.root
    return replace(make_tiny_logreg(), description=f"cache {root}")


# --- Problems a user could get wrong: each must be refused in one line before any training ---


def _tiny_with(**changes: object) -> object:
    problem = make_tiny_logreg()
    return type(problem)(**{**vars(problem), **changes})


def _regression(loss: str, outputs: int, y_train: torch.Tensor, y_test: torch.Tensor) -> object:
    from functools import partial

    from fidelity.problems.models import linear_model

    return _tiny_with(
        loss=loss, y_train=y_train, y_test=y_test, model_factory=partial(linear_model, 3, outputs)
    )


def mse_wider_outputs() -> object:
    """mse with targets [n, 1] against a model giving [n, 3]: would broadcast silently."""
    problem = make_tiny_logreg()
    return _regression("mse", 3, problem.x_train[:, :1].clone(), problem.x_test[:, :1].clone())


def bce_not_binary() -> object:
    """bce targets in {0, 3, 6}."""
    problem = make_tiny_logreg()
    y_train = problem.y_train[:, None].to(problem.dtype) * 3
    return _regression("bce", 1, y_train, problem.y_test[:, None].to(problem.dtype))


def label_out_of_range() -> object:
    problem = make_tiny_logreg()
    return _tiny_with(y_train=problem.y_train.clone().index_fill_(0, torch.tensor([4]), 7))


def negative_label() -> object:
    problem = make_tiny_logreg()
    return _tiny_with(y_train=problem.y_train.clone().index_fill_(0, torch.tensor([2]), -1))


def label_out_of_range_in_test_split() -> object:
    problem = make_tiny_logreg()
    return _tiny_with(y_test=problem.y_test.clone().index_fill_(0, torch.tensor([1]), 3))


def output_too_narrow() -> object:
    """cross_entropy with one output (a bce model)."""
    from functools import partial

    from fidelity.problems.models import linear_model

    return _tiny_with(model_factory=partial(linear_model, 3, 1))


def wrong_input_width() -> object:
    from functools import partial

    from fidelity.problems.models import linear_model

    return _tiny_with(model_factory=partial(linear_model, 7, 3))


def empty_test_split() -> object:
    problem = make_tiny_logreg()
    return _tiny_with(x_test=problem.x_test[:0], y_test=problem.y_test[:0])


def exits_cleanly() -> object:
    import sys

    sys.exit(0)


def exits_with_three() -> object:
    import sys

    sys.exit(3)


def too_big_for_newton() -> object:
    """A 200k-parameter network with a Newton recipe: a dense Hessian of about 330 GB."""
    problem = make_tiny_logreg()

    def factory() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(3, 400),
            torch.nn.Tanh(),
            torch.nn.Linear(400, 500),
            torch.nn.Tanh(),
            torch.nn.Linear(500, 3),
        )

    return type(problem)(**{**vars(problem), "model_factory": factory})


def tiny_minibatch() -> object:
    """The tiny logistic problem trained by 4 epochs of minibatch SGD (20 steps)."""
    import dataclasses

    from fidelity.core.problem import MinibatchRecipe

    recipe = MinibatchRecipe(optimizer="sgd", learning_rate=0.1, epochs=4, batch_size=8)
    return dataclasses.replace(make_tiny_logreg(), recipe=recipe)


def integer_inputs() -> object:
    """The tiny logistic problem with its inputs rounded to integers (refused: a problem's
    inputs must be floating point, so no perturbation or attack can meet them)."""
    import dataclasses

    problem = make_tiny_logreg()
    return dataclasses.replace(problem, x_train=problem.x_train.round().long())
