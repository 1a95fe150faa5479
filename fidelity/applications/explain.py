"""Most helpful and most harmful training points for one test point, per estimator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from fidelity.applications.common import labels, predictions, text_of
from fidelity.core.errors import FidelityError
from fidelity.core.problem import Examples, Problem, TrainedProblem, check_model
from fidelity.estimators import Estimator
from fidelity.retrain import ColdResponse

LooMode = Literal["all", "shown", "none"]


def explain(
    trained: TrainedProblem,
    estimators: Mapping[str, Estimator],
    *,
    test_index: int | None = None,
    text: str | None = None,
    label: int | None = None,
    top: int = 10,
    loo: LooMode = "shown",
    execution=None,
) -> dict[str, object]:
    """The ``top`` training points whose removal would most raise the test point's loss (most
    helpful) and most lower it (most harmful), under each fitted estimator; their texts, labels
    and predicted deltas; the overlap of the top lists between estimators; and, with ``loo``,
    the actual leave-one-out deltas (``cold``) of the points shown (``shown``) or of every
    training point (``all``, which also gives leave-one-out's own top lists and the overlap of
    every estimator with them).

    The test point is ``test_index`` of the problem's test split, or a new ``text`` (text
    problems; its ``label`` defaults to the model's prediction)."""

    problem = trained.problem
    test, description = _test_point(trained, test_index, text, label)
    if not 1 <= top <= problem.n_train // 2:
        raise FidelityError(f"top must lie in [1, {problem.n_train // 2}], got {top}")
    if loo not in ("all", "shown", "none"):
        raise FidelityError(f"loo must be all, shown or none, got {loo!r}")
    train_labels = labels(problem, problem.train).tolist()
    scores = {
        name: e.scores(test, problem.train)[0].detach().cpu() for name, e in estimators.items()
    }
    lists = {
        name: {"helpful": _top(values, top), "harmful": _top(-values, top)}
        for name, values in scores.items()
    }
    actual: dict[int, float] = {}
    if loo != "none":
        if loo == "all":
            removed = torch.arange(problem.n_train)
        else:
            shown = {j for entry in lists.values() for kind in entry.values() for j in kind}
            removed = torch.tensor(sorted(shown))
        result = ColdResponse().compute(trained, test, removed, execution)
        actual = dict(zip(removed.tolist(), result.deltas[0].tolist(), strict=True))
        if loo == "all":
            values = result.deltas[0].cpu()
            scores["leave-one-out"] = values
            lists["leave-one-out"] = {"helpful": _top(values, top), "harmful": _top(-values, top)}

    def row(j: int, name: str) -> dict[str, object]:
        return {
            "index": j,
            "text": text_of(problem.train_texts, j),
            "label": int(train_labels[j]),
            "predicted": float(scores[name][j]),
            "actual": actual.get(j),
        }

    return {
        "application": "explain",
        "problem": problem.name,
        "test": description,
        "top": top,
        "loo": loo,
        "estimators": {
            name: {kind: [row(j, name) for j in chosen] for kind, chosen in entry.items()}
            for name, entry in lists.items()
        },
        "overlap": {
            kind: {
                a: {b: len(set(lists[a][kind]) & set(lists[b][kind])) / top for b in lists}
                for a in lists
            }
            for kind in ("helpful", "harmful")
        },
    }


def _top(values: torch.Tensor, k: int) -> list[int]:
    return torch.topk(values, k).indices.tolist()


def check_explained_point(
    problem: Problem, test_index: int | None, text: str | None, label: int | None
) -> None:
    """The point to explain makes sense for ``problem``, checked before any training: exactly
    one of a test index (in range) and a text (for a problem that encodes text), and a label
    only with a text, one of the model's classes."""
    if (test_index is None) == (text is None):
        raise FidelityError("give exactly one of a test index and a text")
    if test_index is not None:
        if not 0 <= test_index < problem.n_test:
            raise FidelityError(f"test index must lie in [0, {problem.n_test}), got {test_index}")
        if label is not None:
            raise FidelityError("a label goes with a text; a test point has its own label")
        return
    if problem.featurize is None:
        raise FidelityError(f"problem {problem.name!r} cannot encode new text")
    if label is None:
        return
    if problem.loss == "mse":
        raise FidelityError(f"problem {problem.name!r} is a regression; it has no labels")
    classes = 2 if problem.loss == "bce" else check_model(problem).output_width
    if not 0 <= label < classes:
        raise FidelityError(
            f"label {label} is not a class of {problem.name!r} (classes 0 .. {classes - 1})"
        )


def _test_point(
    trained: TrainedProblem, test_index: int | None, text: str | None, label: int | None
) -> tuple[Examples, dict[str, object]]:
    problem = trained.problem
    check_explained_point(problem, test_index, text, label)
    if text is not None and problem.featurize is not None:  # the check rules out the rest
        x = problem.featurize((text,)).to(problem.device, problem.dtype)
        y_placeholder = problem.y_test[:1]
        predicted = int(predictions(trained, Examples(x, y_placeholder))[0])
        chosen = predicted if label is None else int(label)
        if problem.loss == "bce":
            y = torch.tensor([[float(chosen)]], dtype=problem.dtype, device=problem.device)
        else:
            y = torch.tensor([chosen], device=problem.device)
        return Examples(x, y), {"text": text, "label": chosen, "predicted": predicted}
    if test_index is None:  # ruled out by the check; says so to the type checker
        raise FidelityError("give exactly one of a test index and a text")
    point = problem.test.subset(torch.tensor([test_index], device=problem.device))
    return point, {
        "index": test_index,
        "text": text_of(problem.test_texts, test_index),
        "label": int(labels(problem, point)[0]),
        "predicted": int(predictions(trained, point)[0]),
    }
