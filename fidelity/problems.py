"""Built-in problems and the resolution of problem names (registry name or import path)."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from torch import nn

from fidelity.errors import FidelityError
from fidelity.problem import MinibatchRecipe, NewtonRecipe, Problem
from fidelity.registry import Registry, parse_spec

PROBLEMS: Registry[Callable[..., Problem]] = Registry("problem")


def linear_model(in_features: int, out_features: int) -> nn.Module:
    """A linear map with bias; the model of logistic and ridge regression."""
    return nn.Linear(in_features, out_features)


def tanh_mlp(sizes: tuple[int, ...]) -> nn.Module:
    """Linear layers of the given widths with tanh between them (none after the last)."""
    layers: list[nn.Module] = []
    for position, (width_in, width_out) in enumerate(itertools.pairwise(sizes)):
        if position:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(width_in, width_out))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """1x8x8 digits: conv 3x3 (8 channels) + tanh, conv 3x3 stride 2 (8) + tanh, linear to 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.conv1(x.reshape(-1, 1, 8, 8)))
        hidden = torch.tanh(self.conv2(hidden))
        return self.head(hidden.flatten(1))


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


@PROBLEMS.register("digits-logreg", description="digits 8x8, 10-class logistic regression")
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


@PROBLEMS.register("cancer-logreg", description="breast cancer, binary logistic regression")
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


@PROBLEMS.register("diabetes-ridge", description="diabetes, ridge regression (linear, mse)")
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


@PROBLEMS.register("digits-mlp", description="digits, 64-32-10 tanh MLP (non-convex)")
def digits_mlp(seed: int = 0, device: str = "cpu") -> Problem:
    """digits as in digits-logreg, 64-32-10 tanh MLP, weight decay 1e-3, SGD with momentum 0.9,
    learning rate 0.05, batch 64, 100 epochs from a seeded initialisation and batch order."""
    return _with_model(
        digits_logreg(seed, device),
        "digits-mlp",
        partial(tanh_mlp, (64, 32, 10)),
        1e-3,
        digits_mlp.__doc__ or "",
    )


@PROBLEMS.register("diabetes-mlp", description="diabetes, 10-64-64-1 tanh MLP regression")
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


@PROBLEMS.register("digits-cnn", description="digits as 1x8x8 images, two conv layers + linear")
def digits_cnn(seed: int = 0, device: str = "cpu") -> Problem:
    """digits as in digits-logreg viewed as 1x8x8 images, DigitsCNN (two 3x3 tanh conv layers,
    linear head), weight decay 1e-3, SGD with momentum 0.9, learning rate 0.05, batch 64,
    100 epochs."""
    return _with_model(
        digits_logreg(seed, device), "digits-cnn", DigitsCNN, 1e-3, digits_cnn.__doc__ or ""
    )


def load_problem(spec: str) -> Problem:
    """Build the problem registered as ``name`` or returned by the callable at ``pkg.mod:fn``,
    with keyword options given as ``name[key=value,...]`` (e.g. ``movies-minilm-logreg[size=500]``).
    A problem built with options is named by its spec with the options sorted, so results of
    two configurations never share a name."""
    name, options = parse_spec(spec, kind="problem")
    factory = PROBLEMS.get(name)
    if not callable(factory):
        raise FidelityError(f"problem {name!r} is not callable; it must return a Problem")
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        raise FidelityError(
            f"problem {name!r} has no option(s) {', '.join(unknown)}; "
            f"options: {', '.join(accepted) or 'none'}"
        )
    try:
        problem = factory(**options)
    except FidelityError:
        raise
    except Exception as exc:
        raise FidelityError(
            f"problem {name!r} failed to build: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(problem, Problem):
        raise FidelityError(
            f"problem {name!r} returned {type(problem).__name__}, expected fidelity.Problem"
        )
    if options:
        shown = ",".join(f"{key}={options[key]!r}" for key in sorted(options))
        problem = dataclasses.replace(problem, name=f"{problem.name}[{shown}]")
    return problem


# Text problems register themselves on import; their heavy dependencies load only when built.
import fidelity.text.problems  # noqa: E402, F401
