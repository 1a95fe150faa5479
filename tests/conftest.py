"""Shared fixtures: trained built-in problems (trained once per session) and tiny problems."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fidelity.core.problem import NewtonRecipe, Problem
from fidelity.problems import load_problem
from fidelity.problems.models import linear_model
from fidelity.retrain import train

torch.set_default_dtype(torch.float64)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Text problems cache their encodings under $FIDELITY_CACHE_DIR: keep the tests' out of
    the user's cache (and the user's out of the tests)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("fidelity-cache")
        patch.setenv("FIDELITY_CACHE_DIR", str(path))
        # Runs record into the run history by default: never into the working directory's.
        patch.setenv("FIDELITY_HISTORY", str(tmp_path_factory.mktemp("history") / "fidelity.db"))
        yield path


@pytest.fixture(scope="session")
def trained_problems():
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = train(load_problem(name))
        return cache[name]

    return get


def make_tiny_logreg(
    n_train: int = 40,
    n_test: int = 12,
    features: int = 3,
    classes: int = 3,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (n_train + n_test,), generator=generator)
    return Problem(
        name="tiny-logreg",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        model_factory=partial(linear_model, features, classes),
        loss="cross_entropy",
        weight_decay=weight_decay,
        recipe=NewtonRecipe(),
    )


def tiny_problem_for_import(seed: int = 0) -> Problem:
    """Importable as tests.conftest:tiny_problem_for_import (a user problem)."""
    return make_tiny_logreg(seed=seed)


@pytest.fixture
def tiny_logreg() -> Problem:
    return make_tiny_logreg()


def tiny_mlp(features: int, hidden: int, outputs: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(features, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, outputs)
    )


def make_tiny_mlp_problem(loss: str = "cross_entropy", n_train: int = 30, seed: int = 0):
    """A non-convex 3-5-k tanh MLP (k = 3 classes, or 1 output for bce / mse)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + 8, 3, generator=generator, dtype=torch.float64)
    outputs = 3 if loss == "cross_entropy" else 1
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (n_train + 8,), generator=generator)
    elif loss == "bce":
        y = (x[:, :1] + 0.3 * torch.randn(n_train + 8, 1, generator=generator) > 0).double()
    else:
        y = torch.sin(x[:, :1]) + 0.1 * torch.randn(n_train + 8, 1, generator=generator)
    return Problem(
        name=f"tiny-mlp-{loss}",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        model_factory=partial(tiny_mlp, 3, 5, outputs),
        loss=loss,
        weight_decay=1e-2,
        recipe=NewtonRecipe(),
    )


class TinyCNN(torch.nn.Module):
    """2x5x5 inputs (flat), one 3x3 stride-2 tanh conv layer of 3 channels, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.head = torch.nn.Linear(3 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x.reshape(-1, 2, 5, 5))).flatten(1))


class TinyTokenModel(torch.nn.Module):
    """6 positions of 3 features, one Linear applied at every position (tanh, mean over the
    positions), a linear head: a sequence layer the size of a unit test."""

    positions, width = 6, 3

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Linear(self.width, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(x.reshape(x.shape[0], self.positions, self.width))
        return self.head(torch.tanh(hidden).mean(1))


def _two_class_problem(name: str, model_factory, n_train: int, n_test: int, features: int):
    """Gaussian inputs and random binary labels (seed 0), cross-entropy, wd 1e-2, Newton."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (n_train + n_test,), generator=generator)
    return Problem(
        name=name,
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        model_factory=model_factory,
        loss="cross_entropy",
        weight_decay=1e-2,
        recipe=NewtonRecipe(),
    )


def make_tiny_cnn_problem() -> Problem:
    return _two_class_problem("tiny-cnn", TinyCNN, 20, 4, 50)


def make_tiny_token_problem() -> Problem:
    features = TinyTokenModel.positions * TinyTokenModel.width
    return _two_class_problem("tiny-tokens", TinyTokenModel, 40, 8, features)
