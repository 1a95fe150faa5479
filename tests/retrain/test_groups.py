"""Group effects: groups drawn as documented, retrained as the closed form says."""

import numpy as np
import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.retrain import GroupsResponse
from fidelity.retrain.groups import draw_groups


def test_groups_are_random_one_class_or_nearest_neighbours():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4))
    labels = np.repeat([0, 1, 2], 20)
    drawn = draw_groups(x, labels, (5, 12), 3, seed=1)
    assert [kind for kind, _, _ in drawn[:9]] == ["random"] * 3 + ["class"] * 3 + ["neighbours"] * 3
    for kind, size, members in drawn:
        assert members.size == size == np.unique(members).size
        if kind == "class":
            assert np.unique(labels[members]).size == 1
        if kind == "neighbours":  # some member's `size` nearest points are the group
            nearest = [
                set(np.argsort(((x - x[m]) ** 2).sum(1), kind="stable")[:size].tolist())
                for m in members
            ]
            assert set(members.tolist()) in nearest
    assert all(
        np.array_equal(a[2], b[2])
        for a, b in zip(drawn, draw_groups(x, labels, (5, 12), 3, seed=1), strict=True)
    )
    assert {kind for kind, _, _ in draw_groups(x, None, (5,), 1, seed=0)} == {
        "random",
        "neighbours",
    }


def test_removing_a_group_from_ridge_equals_the_closed_form(trained_problems):
    trained = trained_problems("diabetes-ridge")
    problem = trained.problem
    test = problem.test.subset(torch.arange(5))
    result = GroupsResponse(sizes=[20], groups=1).compute(trained, test)
    design = torch.cat([problem.x_train, torch.ones(problem.n_train, 1)], dim=1)
    test_design = torch.cat([test.x, torch.ones(len(test), 1)], dim=1)
    n, p = design.shape
    base = 0.5 * (test_design @ trained.theta - test.y[:, 0]) ** 2
    for row in range(result.members.shape[0]):
        weights = 1.0 - result.members[row]
        system = design.T @ (weights[:, None] * design) + n * problem.weight_decay * torch.eye(p)
        theta = torch.linalg.solve(system, design.T @ (weights * problem.y_train[:, 0]))
        expected = 0.5 * (test_design @ theta - test.y[:, 0]) ** 2 - base
        torch.testing.assert_close(result.per_seed[0, row], expected, rtol=1e-7, atol=1e-12)
    assert result.kinds == ("random", "neighbours")  # mse: no class groups


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"sizes": []}, "non-empty"), ({"sizes": [0]}, "groups.sizes"), ({"target": "x"}, "target")],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(FidelityError, match=message):
        GroupsResponse(**settings)
