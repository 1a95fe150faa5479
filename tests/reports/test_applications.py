"""Application sections escape sentences from data; their figures are written."""

import pytest

from fidelity.applications import explain, mislabel, poison, prefilter
from fidelity.estimators import ExactEstimator
from fidelity.reports.applications import (
    mislabel_figure,
    prefilter_figure,
    render_explain,
    render_mislabel,
    render_poison,
    render_prefilter,
)
from fidelity.retrain import train
from tests.fidelity.user_problems import tiny_text_problem


@pytest.fixture(scope="module")
def results():
    trained = train(tiny_text_problem())
    estimators = {"<i>exact</i>": ExactEstimator().fit(trained)}
    return {
        "explain": explain(trained, estimators, test_index=0, top=5, loo="all"),
        "poison": poison(trained, estimators, budget=4, seeds=(0, 1)),
        "mislabel": mislabel(trained, estimators, flip=0.2, seeds=(0, 1)),
        "prefilter": prefilter(
            trained, estimators["<i>exact</i>"], reference="<i>exact</i>", test_points=range(4)
        ),
    }


def test_every_section_escapes_markup_from_data(results):
    texts = [
        render_explain(results["explain"]),
        render_poison(results["poison"]),
        render_mislabel(results["mislabel"], "mislabel.png"),
        render_prefilter(results["prefilter"], "prefilter.png"),
    ]
    shown = texts[0]
    assert "alert(1)" in shown or "bold" in shown  # the marked-up sentences are listed
    for text in texts:
        for raw in ("<script", "<b>", "<i>", "onerror"):
            assert raw not in text
    assert "&lt;script&gt;" in shown or "&lt;b&gt;" in shown


def test_figures_are_written(results, tmp_path):
    for path in (
        mislabel_figure(results["mislabel"], tmp_path / "m.png"),
        prefilter_figure(results["prefilter"], tmp_path / "p.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_are_json_serialisable(results):
    import json

    for name, result in results.items():
        assert json.loads(json.dumps(result, allow_nan=False))["application"] == name


def test_terminal_text_shows_sentences_as_written_without_control_characters(results):
    from fidelity.reports.markdown import terminal_escape

    assert terminal_escape("it's <b>bold</b>\n\x1b[31mred\x07") == (
        "it's <b>bold</b> \\x1b[31mred\\x07"
    )
    shown = render_explain(results["explain"], escape=terminal_escape)
    assert "&lt;" not in shown and "&#x27;" not in shown and "\x1b" not in shown
    assert "<b>" in shown or "<script" in shown  # the sentences as written
