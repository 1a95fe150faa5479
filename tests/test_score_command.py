"""`fidelity score`: a score matrix computed elsewhere, scored like a run against the suite's
ground truth."""

import numpy as np
import pytest

from fidelity.cli import main
from fidelity.estimators import ExactEstimator
from fidelity.problems import load_problem
from fidelity.results import RunResults
from fidelity.retrain import train
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
    # -q: the error, alone on stderr (the stage lines of the work before it are not errors)
    options = ["--problem", "diabetes-ridge", "--out", str(out), "--no-history", "-q"]
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


LDS_SMALL = (
    SMALL.replace('kind = "exact"', 'kind = "exact"\n[[estimators]]\nkind = "grad-dot"')
    + '[[subsets]]\nkind = "subsets"\nalphas = [0.5]\nsubsets = 25\n'
)


def test_imported_ground_truth_gives_back_the_runs_own_lds(setting, tmp_path):
    root, _, exact = setting
    np.save(root / "exact-lds.npy", exact)
    suite = root / "lds.toml"
    suite.write_text(LDS_SMALL)
    code, out = score(root, suite, "lds-run", "--scores", str(root / "exact-lds.npy"))
    assert code == 0
    problem = RunResults.load(out).problems["diabetes-ridge"]
    (own,) = problem.lds
    arrays = np.load(out / problem.arrays_file)
    masks, measured = arrays["subsets/subsets/masks"], arrays["subsets/subsets/seeds"][0]
    test_index = arrays["test_index"]
    np.savez(
        tmp_path / "trak.npz", masks=masks.astype(bool), margins=measured, test_index=test_index
    )
    kept = np.stack([np.flatnonzero(mask) for mask in masks])
    np.savez(tmp_path / "dattri.npz", indices=kept, values=-measured, test_index=test_index)
    for layout in ("trak", "dattri"):
        path = tmp_path / f"{layout}.npz"
        options = ["--ground-truth", path, "--layout", layout, "--target", "loss"]
        code, run = score(root, suite, f"imported-{layout}", *map(str, options))
        assert code == 0
        found = RunResults.load(run).problems["diabetes-ridge"]
        imported = next(entry for entry in found.lds if entry.response == "imported")
        assert imported.alpha == round(176 / 353, 3) and imported.subsets == 25  # kept fraction
        for estimator in ("exact", "grad-dot"):
            assert imported.metrics[estimator] == own.metrics[estimator], (layout, estimator)
        stored = np.load(run / found.arrays_file)
        assert np.array_equal(stored["test_index"], np.sort(test_index))
        np.testing.assert_array_equal(stored["subsets/imported/seeds"][0], measured)


def test_full_model_values_turn_imported_values_into_changes(setting, tmp_path):
    from fidelity.retrain import read_ground_truth

    values = np.arange(6.0).reshape(2, 3)
    masks = np.array([[1, 0, 1, 1], [0, 1, 1, 1]])
    full = np.array([1.0, 2.0, 3.0])
    np.savez(tmp_path / "t.npz", masks=masks, margins=values, test_index=[0, 4, 2], full=full)
    found = read_ground_truth(tmp_path / "t.npz", "trak", 4, 5)
    np.testing.assert_array_equal(found.values, values - full)
    assert found.changes and found.test_index.tolist() == [0, 4, 2]
    # dattri returns -target for the retrained models; its full-model value is a target too
    np.savez(
        tmp_path / "d.npz",
        indices=[[0, 2], [1, 3]],
        values=-values,
        test_index=[0, 4, 2],
        full=full,
    )
    found = read_ground_truth(tmp_path / "d.npz", "dattri", 4, 5)
    np.testing.assert_array_equal(found.values, values - full)
    np.testing.assert_array_equal(found.masks, [[1, 0, 1, 0], [0, 1, 0, 1]])


@pytest.mark.parametrize(
    ("arrays", "layout", "message"),
    [
        ({"masks": np.ones((2, 4)), "margins": np.ones((2, 1))}, "trak", "no array 'test_index'"),
        (
            {"masks": np.ones((2, 3)), "margins": np.ones((2, 1)), "test_index": [0]},
            "trak",
            r"masks must be \[subsets, 4\]",
        ),
        (
            {"masks": np.full((2, 4), 0.5), "margins": np.ones((2, 1)), "test_index": [0]},
            "trak",
            "masks must hold 0 and 1 only",
        ),
        (
            {"masks": np.eye(4)[:2], "margins": np.ones((3, 1)), "test_index": [0]},
            "trak",
            r"margins are \(3, 1\)",
        ),
        (
            {"masks": np.eye(4)[:2], "margins": np.ones((2, 1)), "test_index": [9]},
            "trak",
            r"test_index must lie in \[0, 5\)",
        ),
        (
            {"indices": [[0, 7]], "values": np.ones((1, 1)), "test_index": [0]},
            "dattri",
            r"indices\[0\] must lie in \[0, 4\)",
        ),
        (
            {"masks": np.ones((1, 4)), "margins": np.ones((1, 1)), "test_index": [0]},
            "trak",
            "keeps no training point or every one",
        ),
        (
            {"masks": np.eye(4)[:1], "margins": np.full((1, 1), np.nan), "test_index": [0]},
            "trak",
            "NaN or infinite",
        ),
    ],
)
def test_bad_ground_truth_files_are_refused(tmp_path, arrays, layout, message):
    from fidelity.core.errors import FidelityError
    from fidelity.retrain import read_ground_truth

    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FidelityError, match=message):
        read_ground_truth(tmp_path / "bad.npz", layout, 4, 5)


def test_a_bad_ground_truth_is_a_one_line_error_exit_2(setting, tmp_path, capsys):
    root, suite, _ = setting
    np.savez(tmp_path / "gt.npz", masks=np.ones((2, 3)), margins=np.ones((2, 1)), test_index=[0])
    code, out = score(root, suite, "bad-gt", "--ground-truth", str(tmp_path / "gt.npz"))
    assert code == 2 and not out.exists()
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "masks must be [subsets, 353]" in error
    code, _ = score(root, suite, "neither")
    assert code == 2 and "needs --scores FILE, --ground-truth FILE" in capsys.readouterr().err
