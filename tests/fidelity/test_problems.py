import subprocess
import sys

import pytest
import torch

from fidelity.core.errors import FidelityError
from fidelity.core.problem import ParamSpec
from fidelity.problems import PROBLEMS, load_problem


@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "features", "loss", "weight_decay"),
    [
        ("digits-logreg", 1437, 360, 64, "cross_entropy", 1e-3),
        ("cancer-logreg", 455, 114, 30, "bce", 1e-2),
        ("diabetes-ridge", 353, 89, 10, "mse", 1e-2),
    ],
)
def test_builtin_problems(name, n_train, n_test, features, loss, weight_decay):
    problem = load_problem(name)
    assert (problem.n_train, problem.n_test) == (n_train, n_test)
    assert problem.x_train.shape[1] == features
    assert problem.loss == loss and problem.weight_decay == weight_decay
    assert problem.dtype == torch.float64
    assert problem.fingerprint() == load_problem(name).fingerprint()


def test_digits_is_scaled_to_unit_interval_and_split_is_stratified():
    problem = load_problem("digits-logreg")
    assert float(problem.x_train.min()) == 0.0 and float(problem.x_train.max()) == 1.0
    train_share = torch.bincount(problem.y_train) / problem.n_train
    test_share = torch.bincount(problem.y_test) / problem.n_test
    assert float((train_share - test_share).abs().max()) < 0.01


def test_standardisation_uses_train_statistics_only():
    problem = load_problem("cancer-logreg")
    torch.testing.assert_close(problem.x_train.mean(0), torch.zeros(30), atol=1e-12, rtol=0)
    assert float(problem.x_test.mean(0).abs().max()) > 1e-3


def test_split_depends_on_seed():
    from fidelity.problems.tabular import digits_logreg

    assert not torch.equal(digits_logreg(seed=0).x_train, digits_logreg(seed=1).x_train)
    assert digits_logreg(seed=0).fingerprint() != digits_logreg(seed=1).fingerprint()


def test_user_problem_by_import_path():
    problem = load_problem("tests.fidelity.user_problems:tiny")
    assert problem.name == "tiny-logreg"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no-such-problem", "unknown problem 'no-such-problem'; valid names: cancer-logreg"),
        ("no_such_package.mod:factory", "cannot import module 'no_such_package.mod'"),
        ("tests.fidelity.user_problems:missing", "has no attribute 'missing'"),
        ("tests.fidelity.user_problems:broken", "failed to build: RuntimeError"),
        ("tests.fidelity.user_problems:not_a_problem", "returned dict, expected"),
        ("tests.fidelity.user_problems:with_nan", "x_test holds 1 NaN"),
    ],
)
def test_bad_problem_names(path, message):
    with pytest.raises(FidelityError, match=message.replace("(", r"\(")):
        load_problem(path)


def test_registry_lists_builtin_problems():
    assert {"digits-logreg", "cancer-logreg", "diabetes-ridge"} <= set(PROBLEMS.names())


def test_param_spec_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    spec = ParamSpec.of(model)
    flat = spec.flatten(dict(model.named_parameters()))
    assert flat.numel() == spec.numel == 3 * 4 + 4 + 4 * 2 + 2
    for name, tensor in spec.unflatten(flat).items():
        assert torch.equal(tensor, dict(model.named_parameters())[name])


@pytest.mark.parametrize(
    ("name", "n_params", "data_from"),
    [
        ("digits-mlp", 64 * 32 + 32 + 32 * 10 + 10, "digits-logreg"),
        ("diabetes-mlp", 10 * 64 + 64 + 64 * 64 + 64 + 64 + 1, "diabetes-ridge"),
        ("digits-cnn", (8 * 9 + 8) + (8 * 8 * 9 + 8) + (128 * 10 + 10), "digits-logreg"),
    ],
)
def test_network_problems(name, n_params, data_from):
    from fidelity.core.problem import MinibatchRecipe

    problem = load_problem(name)
    assert ParamSpec.of(problem.build_model()).numel == n_params
    assert isinstance(problem.recipe, MinibatchRecipe)
    assert problem.weight_decay == 1e-3
    assert torch.equal(problem.x_train, load_problem(data_from).x_train)
    outputs = problem.build_model()(problem.x_test[:5])
    assert outputs.shape == (5, 10 if name.startswith("digits") else 1)
    first = problem.build_model().state_dict()
    assert all(torch.equal(v, problem.build_model().state_dict()[k]) for k, v in first.items())


class _SinLinear(torch.nn.Linear):
    """Same parameters as nn.Linear, different forward: must change the fingerprint."""

    def forward(self, x):
        return torch.sin(super().forward(x))


def test_fingerprint_changes_with_everything_that_determines_training():
    from dataclasses import replace
    from functools import partial

    from fidelity.core.problem import NewtonRecipe

    base = load_problem("diabetes-ridge")
    reference = base.fingerprint()
    changed = {
        "weight decay": replace(base, weight_decay=0.02),
        "recipe": replace(base, recipe=NewtonRecipe(gtol=1e-9)),
        "init seed": replace(base, recipe=NewtonRecipe(init_seed=1)),
        "targets": replace(base, y_train=base.y_train * 1.0001),
        "loss": replace(
            base, loss="bce", y_train=(base.y_train > 0).double(), y_test=(base.y_test > 0).double()
        ),
        "model code": replace(base, model_factory=partial(_SinLinear, 10, 1)),
    }
    for what, problem in changed.items():
        assert problem.fingerprint() != reference, what
    same = {
        "name": replace(base, name="renamed"),
        "test split": replace(base, x_test=base.x_test[:5], y_test=base.y_test[:5]),
        "refit start": replace(base, recipe=NewtonRecipe(refit_start="init")),
    }
    for what, problem in same.items():
        assert problem.fingerprint() == reference, what


def test_fingerprint_handles_zero_dimensional_buffers():
    from dataclasses import replace

    base = load_problem("diabetes-ridge")

    def with_batchnorm():
        return torch.nn.Sequential(torch.nn.BatchNorm1d(10), torch.nn.Linear(10, 1))

    assert len(replace(base, model_factory=with_batchnorm).fingerprint()) == 64


def test_failing_model_factory_is_an_input_error():
    from dataclasses import replace

    from fidelity.core.errors import FidelityError

    def broken():
        raise ValueError("bad width")

    with pytest.raises(FidelityError, match="model_factory failed: ValueError: bad width"):
        replace(load_problem("diabetes-ridge"), model_factory=broken).build_model()


def test_problem_options_reach_the_factory_and_name_the_problem():
    problem = load_problem("digits-logreg[seed=1]")
    assert problem.name == "digits-logreg[seed=1]"
    assert not torch.equal(problem.x_train, load_problem("digits-logreg").x_train)
    torch.testing.assert_close(problem.x_train, load_problem("digits-logreg[ seed = 1 ]").x_train)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("digits-logreg[sed=1]", "no option"),
        ("digits-logreg[1]", "key=value"),
        ("digits-logreg[seed=1", "name\\[key=value"),
        ("digits-logreg[seed=a+b]", "not a literal"),
    ],
)
def test_bad_problem_options(spec, message):
    with pytest.raises(FidelityError, match=message):
        load_problem(spec)


def test_spec_values_are_literals_or_bare_words():
    from fidelity.core.registry import parse_spec

    name, options = parse_spec(
        "ekfac[layers=['a.b', 'c'], damping=1e-3, fisher=empirical]", kind="x"
    )
    assert name == "ekfac"
    assert options == {"layers": ["a.b", "c"], "damping": 1e-3, "fisher": "empirical"}
    assert parse_spec("plain", kind="x") == ("plain", {})


def test_text_problems_are_registered():
    assert {"movies-minilm-logreg", "movies-minilm-finetune"} <= set(PROBLEMS.names())


def test_the_cache_reaches_a_factory_that_takes_one_as_an_argument(tmp_path):
    from fidelity.core.cache import ArtifactCache

    probe = "tests.fidelity.user_problems:cache_probe"
    given = load_problem(probe, cache=ArtifactCache(tmp_path))
    assert given.description == f"cache {tmp_path}"
    assert load_problem(probe).description == "cache None"
    assert load_problem("tests.fidelity.user_problems:tiny", cache=ArtifactCache(tmp_path))
    with pytest.raises(FidelityError, match="'cache' is not an option"):
        load_problem(f"{probe}[cache=1]")


def test_listing_problems_imports_no_problem_module():
    code = (
        "import sys; from fidelity.problems import PROBLEMS; names = PROBLEMS.names(); "
        "assert 'digits-mlp' in names and 'movies-minilm-logreg' in names; "
        "assert not [m for m in sys.modules if m.startswith('fidelity.problems.')], sys.modules; "
        "assert 'sklearn' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
