"""The applications on small convex problems, where leave-one-out and retraining are exact."""

import numpy as np
import pytest
import torch

from fidelity.applications import (
    attack,
    build_estimators,
    explain,
    mislabel,
    perturbation_agreement,
    poison,
    prefilter,
)
from fidelity.applications.common import flip_labels, self_influence
from fidelity.applications.prefilter import bm25_similarity, tfidf_similarity
from fidelity.core.errors import FidelityError
from fidelity.estimators import ExactEstimator
from fidelity.problems import load_problem
from fidelity.retrain import ColdResponse, train
from tests.conftest import make_tiny_logreg, make_tiny_mlp_problem


@pytest.fixture(scope="module")
def cancer():
    return train(load_problem("cancer-logreg"))


def test_explain_lists_follow_the_scores_and_leave_one_out(cancer):
    problem = cancer.problem
    estimators = {"exact": ExactEstimator().fit(cancer)}
    result = explain(cancer, estimators, test_index=4, top=5, loo="all")
    scores = estimators["exact"].scores(problem.test.subset(torch.tensor([4])), problem.train)[0]
    helpful = [row["index"] for row in result["estimators"]["exact"]["helpful"]]
    assert helpful == torch.topk(scores, 5).indices.tolist()
    harmful = [row["predicted"] for row in result["estimators"]["exact"]["harmful"]]
    assert harmful == sorted(harmful) and harmful[0] < 0
    loo = ColdResponse().compute(
        cancer, problem.test.subset(torch.tensor([4])), torch.tensor(helpful)
    )
    actual = [row["actual"] for row in result["estimators"]["exact"]["helpful"]]
    np.testing.assert_allclose(actual, loo.deltas[0].numpy(), rtol=1e-10)
    # Exact influence on a convex problem finds most of leave-one-out's own top lists.
    assert result["overlap"]["helpful"]["exact"]["leave-one-out"] >= 0.6
    assert result["overlap"]["helpful"]["exact"]["exact"] == 1.0
    assert result["test"]["text"] is None and result["test"]["index"] == 4


def test_explain_input_errors(cancer):
    estimators = {"exact": ExactEstimator().fit(cancer)}
    with pytest.raises(FidelityError, match="exactly one"):
        explain(cancer, estimators, test_index=1, text="hello")
    with pytest.raises(FidelityError, match="cannot encode"):
        explain(cancer, estimators, text="hello")
    with pytest.raises(FidelityError, match="test index"):
        explain(cancer, estimators, test_index=10**6)
    with pytest.raises(FidelityError, match="loo"):
        explain(cancer, estimators, test_index=1, loo="some")


def test_self_influence_is_the_diagonal_of_the_scores(cancer):
    estimator = ExactEstimator().fit(cancer)
    train_set = cancer.problem.train
    expected = estimator.scores(train_set, train_set).diagonal()
    torch.testing.assert_close(self_influence(estimator, train_set, chunk=37), expected)
    assert bool((expected > 0).all())  # g^T H^-1 g with H positive definite


def test_flipping_labels():
    generator = torch.Generator().manual_seed(0)
    binary = make_tiny_mlp_problem("bce")
    index = torch.tensor([0, 3, 5])
    flipped = flip_labels(binary, index, generator)
    torch.testing.assert_close(flipped.y_train[index], 1 - binary.y_train[index])
    torch.testing.assert_close(flipped.y_train[6:], binary.y_train[6:])
    multiclass = make_tiny_logreg(classes=3)
    changed = flip_labels(multiclass, torch.arange(20), generator)
    assert bool((changed.y_train[:20] != multiclass.y_train[:20]).all())
    assert int(changed.y_train.max()) <= 2
    with pytest.raises(FidelityError, match="classification"):
        flip_labels(make_tiny_mlp_problem("mse"), index, generator)


def test_poison_by_influence_lowers_accuracy_more_than_random(cancer):
    estimators = {"exact": ExactEstimator().fit(cancer)}
    result = poison(cancer, estimators, budget=30, seeds=(0, 1, 2))
    before = result["accuracy_before"]["mean"]
    after = result["accuracy_after"]
    assert result["deterministic_training"]
    # Convex: the same flips give the same model whatever the seed, measured once.
    assert len(after["exact"]["values"]) == 1 and after["exact"]["low"] is None
    assert len(result["accuracy_before"]["values"]) == 1
    assert len(after["random"]["values"]) == 3 and after["random"]["low"] is not None
    assert after["exact"]["mean"] < before
    assert after["exact"]["mean"] < after["random"]["mean"]
    assert len(result["flipped"]["exact"]) == 30
    # Paired by seed against the random flips: the one convex value against each seed's random.
    beyond = result["drop_beyond_random"]["exact"]
    expected = np.array(after["random"]["values"]) - after["exact"]["values"][0]
    assert beyond["values"] == pytest.approx(expected.tolist())
    assert beyond["mean"] > 0 and beyond["low"] is not None and 0 <= beyond["p_value"] <= 1
    with pytest.raises(FidelityError, match="budget"):
        poison(cancer, estimators, budget=0)


def test_mislabel_detection_and_fixing_everything_restores_the_clean_model(cancer):
    estimators = {"exact": ExactEstimator()}
    result = mislabel(cancer, estimators, flip=0.1, seeds=(0,), check_fractions=(0.2, 1.0))
    rankings = result["rankings"]
    assert set(rankings) == {"exact", "training loss", "random"}
    for entry in rankings.values():
        found = entry["curve"]["found"]
        assert found[-1] == pytest.approx(1.0) and np.all(np.diff(found) >= 0)
        # Checking every point fixes every label: exactly the clean model's accuracy.
        assert entry["accuracy_after_fixing"]["1.0"]["mean"] == pytest.approx(
            result["accuracy_clean"], abs=1e-12
        )
    assert rankings["exact"]["auc"]["mean"] > rankings["random"]["auc"]["mean"] + 0.1
    assert result["flipped_count"] == round(0.1 * cancer.problem.n_train)
    beyond = rankings["exact"]["auc_beyond_random"]
    difference = rankings["exact"]["auc"]["mean"] - rankings["random"]["auc"]["mean"]
    assert beyond["mean"] == pytest.approx(difference) and beyond["p_value"] is None  # one seed
    assert "auc_beyond_random" not in rankings["random"]
    assert set(rankings["exact"]["accuracy_beyond_random"]) == {"0.2", "1.0"}


def test_the_paired_comparison_against_a_baseline():
    from fidelity.applications.common import against_baseline

    paired = against_baseline([0.9, 0.85, 0.88], [0.7, 0.66, 0.69])
    assert paired["mean"] == pytest.approx(np.mean([0.2, 0.19, 0.19]))
    assert paired["low"] < paired["mean"] < paired["high"] and paired["p_value"] < 0.05
    from scipy import stats

    expected = stats.ttest_rel([0.9, 0.85, 0.88], [0.7, 0.66, 0.69]).pvalue
    assert paired["p_value"] == pytest.approx(expected, rel=1e-9)
    once = against_baseline([0.9], [0.7, 0.72, 0.69])
    assert once["values"] == pytest.approx([0.2, 0.18, 0.21])
    with pytest.raises(FidelityError, match="paired comparison"):
        against_baseline([0.9, 0.8], [0.7, 0.72, 0.69])


def test_bm25_equals_its_definition_on_a_tiny_corpus():
    documents = ["the cat sat", "the cat sat on the cat mat", "dogs bark", "a mat"]
    queries = ["cat mat", "dogs and cats"]
    k1, b = 1.5, 0.75
    tokens = [d.split() for d in documents]
    average = np.mean([len(t) for t in tokens])
    expected = np.zeros((2, 4))
    for q, query in enumerate(queries):
        for term in set(query.split()):
            df = sum(term in t for t in tokens)
            idf = np.log(1 + (4 - df + 0.5) / (df + 0.5))
            for d, words in enumerate(tokens):
                tf = words.count(term)
                expected[q, d] += (
                    idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(words) / average))
                )
    np.testing.assert_allclose(bm25_similarity(queries, documents), expected, rtol=1e-12)
    similarity = tfidf_similarity(queries, documents)
    assert similarity.shape == (2, 4) and np.all(similarity[0, [1, 3]] > 0)


def test_prefilter_recall_reaches_one_and_beats_random_on_text():
    from tests.fidelity.user_problems import tiny_text_problem

    trained = train(tiny_text_problem())
    estimator = ExactEstimator().fit(trained)
    result = prefilter(
        trained, estimator, reference="exact", test_points=range(4), candidates=(2, 5, 40), top=3
    )
    n = trained.problem.n_train
    assert result["candidates"] == [2, 5, n]
    for method in ("tfidf", "bm25"):
        assert result["recall"][method][str(n)] == 1.0
    assert result["recall"]["random"]["2"] == pytest.approx(2 / n)
    with pytest.raises(FidelityError, match="text"):
        prefilter(train(make_tiny_logreg()), estimator, reference="exact", test_points=[0])


def test_build_estimators_from_specs():
    built = build_estimators(["exact", "cg[damping=0.01,tol=1e-6]"])
    assert built["cg[damping=0.01,tol=1e-6]"].damping == 0.01
    with pytest.raises(FidelityError, match="unknown estimator"):
        build_estimators(["nope"])
    with pytest.raises(FidelityError):
        build_estimators(["cg[dampin=0.1]"])


def test_perturbation_agreement_is_first_order_and_breaks_down_only_for_large_steps():
    trained = train(make_tiny_logreg())
    result = perturbation_agreement(
        trained, ExactEstimator().fit(trained), test_points=5, train_points=4, eps=(1e-4, 30.0)
    )
    rows = {(row["direction"], row["eps"]): row for row in result["rows"]}
    for kind in ("random", "worst"):
        small = rows[(kind, 1e-4)]
        assert small["pearson"] > 0.9999 and abs(small["slope"] - 1) < 1e-3
    # a step of 30 (inputs are standard normal) is far outside the first-order regime
    assert rows[("random", 1e-4)]["breaks_down_at"] in (30.0, None)
    assert result["input_space"] == "the model's input"
    with pytest.raises(FidelityError, match="eps must be positive"):
        perturbation_agreement(trained, ExactEstimator().fit(trained), eps=(0.1, 0.0))


def test_attack_raises_the_attacked_losses_beyond_random_moves():
    problem = make_tiny_logreg(n_train=40, n_test=12)
    trained = train(problem)
    estimator = ExactEstimator().fit(trained)
    result = attack(trained, estimator, test_points=6, budget=1.0, steps=4, seed=1)
    outcomes = result["outcomes"]
    assert set(outcomes) == {
        "attack",
        "random signs, same point",
        "random signs, most influential point",
    }
    attacked = outcomes["attack"]["loss_change"]["mean"]
    assert attacked > outcomes["random signs, same point"]["loss_change"]["mean"]
    assert attacked > 0
    assert outcomes["attack"]["largest_step"] <= 1.0 + 1e-12  # within the budget
    low, high = result["value_range"]
    for shown in result["shown"]:
        assert min(shown["perturbed"]) >= low - 1e-12 and max(shown["perturbed"]) <= high + 1e-12
    rate = outcomes["attack"]["flip_rate"]
    assert rate["low"] <= rate["value"] <= rate["high"]


def test_attack_input_errors():
    trained = train(make_tiny_logreg())
    estimator = ExactEstimator().fit(trained)
    low, high = (float(trained.problem.x_train.min()), float(trained.problem.x_train.max()))
    with pytest.raises(FidelityError, match="budget must be a positive number"):
        attack(trained, estimator, budget=0.0)
    with pytest.raises(FidelityError, match="exceeds the width of the data range"):
        attack(trained, estimator, budget=2 * (high - low))
    with pytest.raises(FidelityError, match="low < high"):
        attack(trained, estimator, value_range=(1.0, 1.0))
    ridge = train(make_tiny_mlp_problem(loss="mse"))
    with pytest.raises(FidelityError, match="needs a classification problem"):
        attack(ridge, ExactEstimator().fit(ridge))


def test_damping_protocol_chooses_on_held_out_subsets_and_scores_on_the_others():
    from fidelity.applications import damping_protocol
    from fidelity.metrics import lds
    from fidelity.retrain import SubsetsResponse

    trained = train(make_tiny_mlp_problem(loss="cross_entropy", n_train=40))
    problem = trained.problem
    grid = (1e-6, 1e-3, 0.1, 1.0)
    result = damping_protocol(
        trained, ["exact", "gnh"], grid=grid, test_points=6, subsets=8, bootstrap=50
    )
    # the same subsets, retrained again here, give the same scoring LDS at every damping
    test = problem.test.subset(torch.as_tensor(result["test_index"]))
    found = SubsetsResponse(alphas=(0.5,), subsets=16, seed=0).compute(trained, test)
    dropped = 1 - found.masks
    for row in result["rows"]:
        scored = [entry for entry in row["grid"] if "refused" not in entry]
        assert scored, row
        best_selection = max(scored, key=lambda entry: entry["selection"]["value"])
        best_scoring = max(scored, key=lambda entry: entry["scoring"]["value"])
        assert row["held_out"]["damping"] == best_selection["damping"]
        assert row["hindsight"]["damping"] == best_scoring["damping"]
        assert row["optimism"] >= 0
        kind = row["estimator"]
        for entry in scored:
            estimator = ExactEstimator(
                damping=entry["damping"], curvature="hessian" if kind == "exact" else "gnh"
            ).fit(trained)
            predicted = (dropped @ estimator.scores(test, problem.train).T).numpy()
            expected = lds(predicted[8:], found.measured.numpy()[8:], n_boot=50)["lds"].value
            assert entry["scoring"]["value"] == pytest.approx(expected, abs=1e-12)


def test_damping_protocol_records_a_refused_damping():
    # a network a few epochs into training has an indefinite Hessian: damping 1e-6 is refused
    # and recorded, 10 is scored
    import dataclasses

    from fidelity.applications import damping_protocol
    from fidelity.core.problem import MinibatchRecipe

    problem = make_tiny_mlp_problem(loss="cross_entropy", n_train=24)
    recipe = MinibatchRecipe(
        optimizer="sgd", learning_rate=0.1, momentum=0.9, epochs=4, batch_size=8
    )
    trained = train(dataclasses.replace(problem, recipe=recipe, name="tiny-mlp-minibatch"))
    result = damping_protocol(
        trained, ["exact"], grid=(1e-6, 10.0), test_points=3, subsets=4, bootstrap=20
    )
    (row,) = result["rows"]
    assert "not positive definite" in row["grid"][0]["refused"]
    assert "refused" not in row["grid"][1]
    assert row["held_out"]["damping"] == row["hindsight"]["damping"] == 10.0


def test_damping_protocol_input_errors():
    from fidelity.applications import damping_protocol

    trained = train(make_tiny_logreg())
    with pytest.raises(FidelityError, match="positive and finite"):
        damping_protocol(trained, ["gnh"], grid=(0.0, 1.0))
    with pytest.raises(FidelityError, match="at least two"):
        damping_protocol(trained, ["gnh"], grid=(1.0,))
    with pytest.raises(FidelityError, match="no damping to sweep"):
        damping_protocol(trained, ["grad-dot"])
