"""Tabular problems on scikit-learn's bundled data sets (digits, breast cancer, diabetes)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from fidelity.core.checks import check_nonnegative, check_positive_int
from fidelity.core.problem import MinibatchRecipe, NewtonRecipe, Problem
from fidelity.problems.models import DigitsCNN, linear_model, tanh_mlp

NETWORK_RECIPE = MinibatchRecipe(
    optimizer="sgd", learning_rate=0.05, momentum=0.9, epochs=100, batch_size=64
)


def _split(
    features: np.ndarray, targets: np.ndarray, *, seed: int, stratify: bool, test_size: float = 0.2
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    return train_test_split(
        features,
        targets,
        test_size=test_size,
        random_state=seed,
        stratify=targets if stratify else None,
    )


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def digits_logreg(seed: int = 0, device: str = "cpu") -> Problem:
    """scikit-learn digits scaled to [0, 1], stratified 80/20 split by ``seed``, multinomial
    logistic regression with bias, weight decay 1e-3, float64."""
    from sklearn.datasets import load_digits

    features, targets = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = _split(features / 16.0, targets, seed=seed, stratify=True)
    as_x = partial(torch.tensor, dtype=torch.float64, device=device)
    as_y = partial(torch.tensor, dtype=torch.long, device=device)
    return Problem(
        name="digits-logreg",
        x_train=as_x(x_train),
        y_train=as_y(y_train),
        x_test=as_x(x_test),
        y_test=as_y(y_test),
        model_factory=partial(linear_model, 64, 10),
        loss="cross_entropy",
        weight_decay=1e-3,
        recipe=NewtonRecipe(),
        description=digits_logreg.__doc__ or "",
    )


def cancer_logreg(seed: int = 0, device: str = "cpu") -> Problem:
    """scikit-learn breast cancer, features standardised on the train split, stratified 80/20
    split by ``seed``, binary logistic regression (bce on a logit), weight decay 1e-2, float64."""
    from sklearn.datasets import load_breast_cancer

    features, targets = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = _split(features, targets, seed=seed, stratify=True)
    x_train, x_test = _standardise(x_train, x_test)
    as_x = partial(torch.tensor, dtype=torch.float64, device=device)
    return Problem(
        name="cancer-logreg",
        x_train=as_x(x_train),
        y_train=as_x(y_train.reshape(-1, 1)),
        x_test=as_x(x_test),
        y_test=as_x(y_test.reshape(-1, 1)),
        model_factory=partial(linear_model, 30, 1),
        loss="bce",
        weight_decay=1e-2,
        recipe=NewtonRecipe(),
        description=cancer_logreg.__doc__ or "",
    )


def diabetes_ridge(seed: int = 0, device: str = "cpu") -> Problem:
    """scikit-learn diabetes, features and target standardised on the train split, 80/20 split
    by ``seed``, linear model with bias, half squared error, weight decay 1e-2, float64."""
    from sklearn.datasets import load_diabetes

    features, targets = load_diabetes(return_X_y=True)
    x_train, x_test, y_train, y_test = _split(features, targets, seed=seed, stratify=False)
    x_train, x_test = _standardise(x_train, x_test)
    y_train, y_test = _standardise(y_train.reshape(-1, 1), y_test.reshape(-1, 1))
    as_x = partial(torch.tensor, dtype=torch.float64, device=device)
    return Problem(
        name="diabetes-ridge",
        x_train=as_x(x_train),
        y_train=as_x(y_train),
        x_test=as_x(x_test),
        y_test=as_x(y_test),
        model_factory=partial(linear_model, 10, 1),
        loss="mse",
        weight_decay=1e-2,
        recipe=NewtonRecipe(),
        description=diabetes_ridge.__doc__ or "",
    )


def _with_model(
    base: Problem, name: str, factory, weight_decay: float, description: str
) -> Problem:
    return Problem(
        name=name,
        x_train=base.x_train,
        y_train=base.y_train,
        x_test=base.x_test,
        y_test=base.y_test,
        model_factory=factory,
        loss=base.loss,
        weight_decay=weight_decay,
        recipe=NETWORK_RECIPE,
        description=description,
    )


def digits_mlp(
    seed: int = 0,
    device: str = "cpu",
    width: int = 32,
    depth: int = 1,
    weight_decay: float = 1e-3,
) -> Problem:
    """digits as in digits-logreg, 64-32-10 tanh MLP, weight decay 1e-3, SGD with momentum 0.9,
    learning rate 0.05, batch 64, 100 epochs from a seeded initialisation and batch order.
    ``width``, ``depth`` (hidden layers) and ``weight_decay`` change the network and its
    objective (Basu et al.'s fragility sweep)."""
    width = check_positive_int(width, "digits-mlp.width")
    depth = check_positive_int(depth, "digits-mlp.depth")
    weight_decay = check_nonnegative(weight_decay, "digits-mlp.weight_decay")
    return _with_model(
        digits_logreg(seed, device),
        "digits-mlp",
        partial(tanh_mlp, (64, *([width] * depth), 10)),
        weight_decay,
        digits_mlp.__doc__ or "",
    )


def diabetes_mlp(seed: int = 0, device: str = "cpu") -> Problem:
    """diabetes as in diabetes-ridge, 10-64-64-1 tanh MLP, half squared error, weight decay
    1e-3, SGD with momentum 0.9, learning rate 0.05, batch 64, 100 epochs (the UCI-style
    regression setting of Bae et al. 2022)."""
    return _with_model(
        diabetes_ridge(seed, device),
        "diabetes-mlp",
        partial(tanh_mlp, (10, 64, 64, 1)),
        1e-3,
        diabetes_mlp.__doc__ or "",
    )


def digits_cnn(seed: int = 0, device: str = "cpu") -> Problem:
    """digits as in digits-logreg viewed as 1x8x8 images, DigitsCNN (two 3x3 tanh conv layers,
    linear head), weight decay 1e-3, SGD with momentum 0.9, learning rate 0.05, batch 64,
    100 epochs."""
    return _with_model(
        digits_logreg(seed, device), "digits-cnn", DigitsCNN, 1e-3, digits_cnn.__doc__ or ""
    )
