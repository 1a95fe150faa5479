"""`fidelity score`: a score matrix computed elsewhere, scored like a run against the suite's
ground truth."""

import numpy as np
import pytest

from estimators import ExactEstimator
from fidelity.cli import main
from fidelity.problems import load_problem
from fidelity.results import RunResults
from retrain import train
from tests.test_cli import SMALL


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    suite = root / "small.toml"
    suite.write_text(SMALL)
    trained = train(load_problem("diabetes-ridge"))
    problem = trained.problem
    exact = ExactEstimator().fit(trained).scores(problem.test, problem.train).numpy()
    return root, suite, exact


def assert_same_metrics(found, expected):
    """Equal up to rounding: our exact scores the run's points in other batches than the file's."""
    for response, metrics in expected.items():
        for name, interval in metrics.items():
            got = found[response][name]
            for part in ("value", "low", "high"):
                assert getattr(got, part) == pytest.approx(getattr(interval, part), abs=1e-12)


def score(root, suite, name, *extra):
    out = root / name
    options = ["--problem", "diabetes-ridge", "--out", str(out), "--no-history"]
    code = main(["score", str(suite), *options, "--cache-dir", str(root / "cache"), *extra])
    return code, out


def test_exported_exact_scores_score_exactly_as_exact(setting):
    root, suite, exact = setting
    np.save(root / "exact.npy", exact)
    code, out = score(root, suite, "npy", "--scores", str(root / "exact.npy"))
    assert code == 0
    problem = RunResults.load(out).problems["diabetes-ridge"]
    assert set(problem.metrics) == {"exact", "scores"}
    assert_same_metrics(problem.metrics["scores"], problem.metrics["exact"])
    arrays = np.load(out / problem.arrays_file)
    np.testing.assert_allclose(
        arrays["estimator/scores"], arrays["estimator/exact"], rtol=1e-12, atol=1e-18
    )
    assert problem.estimators["scores"].settings["sign"] == "removal"


def test_upweighting_scores_are_converted_once(setting):
    root, suite, exact = setting
    n_train = exact.shape[1]
    np.savez(root / "up.npz", scores=-n_train * exact)  # d loss / d upweighting
    code, out = score(root, suite, "up", "--scores", str(root / "up.npz"), "--sign", "upweighting")
    assert code == 0
    problem = RunResults.load(out).problems["diabetes-ridge"]
    arrays = np.load(out / problem.arrays_file)
    np.testing.assert_allclose(
        arrays["estimator/scores"], arrays["estimator/exact"], rtol=1e-12, atol=1e-18
    )


def test_safetensors_with_index_arrays(setting):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    root, suite, exact = setting
    arrays = {
        "influence": exact,
        "test_index": np.arange(exact.shape[0], dtype=np.int64),
        "train_index": np.arange(exact.shape[1], dtype=np.int64),
    }
    safetensors_numpy.save_file(arrays, str(root / "exact.safetensors"))
    code, out = score(
        root, suite, "st", "--scores", str(root / "exact.safetensors"), "--key", "influence"
    )
    assert code == 0
    problem = RunResults.load(out).problems["diabetes-ridge"]
    assert_same_metrics(problem.metrics["scores"], problem.metrics["exact"])


def test_bad_score_files_are_one_line_errors(setting, capsys):
    root, suite, exact = setting
    np.save(root / "short.npy", exact[:, :-1])
    np.savez(root / "few.npz", scores=exact[:2], test_index=np.array([0, 1]))
    np.savez(root / "twice.npz", scores=exact[:2], test_index=np.array([0, 0]))
    np.save(root / "nan.npy", np.full_like(exact, np.nan))
    np.save(root / "int.npy", np.zeros(exact.shape, dtype=np.int64))
    cases = {
        "short.npy": "needs",
        "few.npz": "covers no score for",
        "twice.npz": "holds an index twice",
        "nan.npy": "NaN or infinite",
        "int.npy": "2-d floating-point array",
        "missing.npy": "does not exist",
    }
    for name, message in cases.items():
        capsys.readouterr()
        code, out = score(root, suite, f"bad-{name}", "--scores", str(root / name))
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (name, err)
        assert not out.exists()
    capsys.readouterr()
    assert main(["score", str(suite), "--scores", str(root / "short.npy")]) == 2
    assert "name one with --problem" in capsys.readouterr().err
