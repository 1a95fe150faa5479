"""Every figure print-ready: each report figure of a run that has every stage, and each paper
figure drawn from such runs, is checked for text outside the canvas (titles, labels, legends:
nothing clipped) and, for the PDFs, for TrueType fonts (journals reject Type 3)."""

from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from fidelity.cli import main

EVERYTHING = """
name = "everything"
problems = ["tests.fidelity.user_problems:tiny", "tests.fidelity.user_problems:tiny_network"]
[selection]
test_points = 4
top = 4
random = 6
top_by = "exact"
[metrics]
bootstrap = 50
[[estimators]]
kind = "exact"
damping = 0.1
[[estimators]]
kind = "gnh"
damping = 0.1
[[estimators]]
kind = "grad-dot"
[[responses]]
kind = "cold"
seeds = 2
[[responses]]
kind = "warm"
[[responses]]
kind = "proximal"
damping = 0.1
[[responses]]
kind = "pbrf"
damping = 0.1
[[responses]]
kind = "linear"
damping = 0.1
[[subsets]]
kind = "subsets"
alphas = [0.5, 0.8]
subsets = 12
seeds = 2
[[counterfactuals]]
kind = "counterfactual"
ks = [2, 5]
seeds = 1
[[groups]]
kind = "groups"
sizes = [3, 6]
groups = 2
seeds = 1
"""


def drawn_tick_labels(axis):
    """The tick labels matplotlib draws: those of ticks inside the view limits."""
    for ticks, limits in (
        (axis.xaxis.get_major_ticks(), axis.get_xlim()),
        (axis.yaxis.get_major_ticks(), axis.get_ylim()),
    ):
        low, high = sorted(limits)
        span = (high - low) * 1e-9
        for tick in ticks:
            if low - span <= tick.get_loc() <= high + span:
                yield from (tick.label1, tick.label2)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure saved while a run of every stage is reported and each paper figure is
    drawn from it, with the text that lay outside its canvas."""
    root = tmp_path_factory.mktemp("figures")
    (root / "everything.toml").write_text(EVERYTHING)
    found: dict[str, list[str]] = {}
    original = matplotlib.figure.Figure.savefig

    def checked(figure, path, *args, **kwargs):
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        box = figure.bbox
        outside = []
        # The drawn texts only (a tick label beyond the view limits is not drawn).
        drawn_texts = [
            text
            for axis in figure.axes
            for text in (
                axis.title,
                axis._left_title,
                axis._right_title,
                axis.xaxis.label,
                axis.yaxis.label,
                *drawn_tick_labels(axis),
                *(axis.get_legend().get_texts() if axis.get_legend() else ()),
            )
        ]
        drawn_texts += [
            *figure.texts,
            *(t for legend in figure.legends for t in legend.get_texts()),
        ]
        if figure._suptitle is not None:
            drawn_texts.append(figure._suptitle)
        for text in drawn_texts:
            if not text.get_visible() or not text.get_text().strip():
                continue
            extent = text.get_window_extent(renderer)
            if (
                extent.x0 < box.x0 - 1
                or extent.y0 < box.y0 - 1
                or extent.x1 > box.x1 + 1
                or extent.y1 > box.y1 + 1
            ):
                outside.append(text.get_text())
        # Everything drawn (legends, colour bars, tick labels) inside the canvas.
        tight = figure.get_tightbbox(renderer).transformed(figure.dpi_scale_trans)
        if tight.x0 < -1 or tight.y0 < -1 or tight.x1 > box.x1 + 1 or tight.y1 > box.y1 + 1:
            outside.append(f"drawn area {tight.bounds} beyond the canvas {box.bounds}")
        found[str(path)] = outside
        return original(figure, path, *args, **kwargs)

    patch = pytest.MonkeyPatch()
    patch.setattr(matplotlib.figure.Figure, "savefig", checked)
    try:
        run = root / "run"
        args = ["--cache-dir", str(root / "cache"), "--history", str(root / "h.db"), "-q"]
        assert main(["run", str(root / "everything.toml"), "--out", str(run), *args]) == 0
        assert (
            main(["run", str(root / "everything.toml"), "--out", str(root / "again"), *args]) == 0
        )
        assert main(["report", str(root / "again"), "--history", str(root / "h.db"), "-q"]) == 0
        for name in (
            "bae2022-decomposition",
            "estimator-ladder",
            "lds-loo-table",
            "koh2019-groups",
            "curvature-ladder",
        ):
            out = root / "paper"
            assert main(["figures", name, "--out", str(out), "--run", str(run), "-q"]) == 0
    finally:
        patch.undo()
    return root, found


def test_every_report_figure_is_drawn_with_no_text_outside_the_canvas(drawn):
    _, found = drawn
    names = {Path(p).name for p in found if "/figures/" in p}
    assert "trends.png" in names  # the second run's report draws the trend
    for suffix in ("correlations", "per-test", "decomposition", "lds", "counterfactual"):
        assert any(name.endswith(f"-{suffix}.png") for name in names), (suffix, names)
    assert any("groups" in name for name in names)
    clipped = {Path(path).name: texts for path, texts in found.items() if texts}
    assert not clipped, "\n".join(f"{name}: {texts}" for name, texts in clipped.items())


def test_every_paper_figure_embeds_truetype_fonts(drawn):
    root, _ = drawn
    pdfs = sorted((root / "paper").glob("*.pdf"))
    assert [p.stem for p in pdfs] == sorted(
        [
            "bae2022-decomposition",
            "estimator-ladder",
            "lds-loo-table",
            "koh2019-groups",
            "curvature-ladder",
        ]
    )
    for pdf in pdfs:
        data = pdf.read_bytes()
        assert b"/Type3" not in data, pdf.name
        assert b"/TrueType" in data or b"/CIDFontType2" in data, pdf.name


def test_koh2017_fig2_refuses_runs_it_would_ignore(tmp_path, capsys):
    code = main(["figures", "koh2017-fig2", "--out", str(tmp_path), "--run", str(tmp_path), "-q"])
    assert code == 2
    assert "reads no --run" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_trend_labels_are_unique_and_correlation_limits_follow_the_data():
    from fidelity.reports.figures import _correlation_limits, _unique_run_labels

    created = ["2026-12-01T10:00:01+00:00", "2026-12-01T10:00:59+00:00", "2026-12-01T10:00:59"]
    labels = _unique_run_labels(created)
    assert len(set(labels)) == 3 and labels[0] == "12-01 10:00:01"
    assert _unique_run_labels(["2026-12-01T10:00:00", "2026-12-02T11:00:00"]) == [
        "12-01 10:00",
        "12-02 11:00",
    ]
    low, high = _correlation_limits(np.array([0.95, 0.99]))
    assert 0.9 < low < 0.95 and 0.99 < high <= 1.05


def test_interval_bars_draw_the_interval_even_when_it_excludes_the_point():
    # A percentile interval of a correlation near 1 can end a few ulps below its point estimate
    # (seen in CI: exact vs linear, r = 1.0 with high = 1.0 - 1e-16), or lie wholly below it.
    from fidelity.reports.format import interval_bars

    figure = matplotlib.figure.Figure()
    axis = figure.add_subplot()
    value = np.array([1.0, 0.8, 0.5])
    low = np.array([0.99, 0.6, np.nan])
    high = np.array([1.0 - 1e-16, 0.7, np.nan])
    axis.plot([0, 1, 2], value, "o")
    interval_bars(axis, [0, 1, 2], low, high, "C0", capsize=2)
    segments = axis.collections[-1].get_segments()
    drawn = [(s[0][1], s[1][1]) for s in segments if len(s) == 2 and np.isfinite(s).all()]
    assert drawn[0] == pytest.approx((0.99, 1.0 - 1e-16), abs=1e-15)
    assert drawn[1] == pytest.approx((0.6, 0.7))
    assert len(drawn) == 2


def test_the_curvature_ladder_table_gives_each_rung_its_gap(drawn):
    root, _ = drawn
    table = (root / "paper" / "curvature-ladder.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny")]
    # exact, gnh and grad-dot ran (in ladder order), on both problems
    assert [row.split(" | ")[1] for row in rows[:3]] == ["exact", "gnh", "grad-dot"]
    assert all(len(row.split(" | ")) == 6 for row in rows)


def test_basu_fragility_draws_both_sweeps_and_refuses_runs_without_them(drawn, tmp_path, capsys):
    from fidelity.reports.paper import basu_fragility

    rows = [
        {
            "problem": f"digits-mlp[depth={depth},width={width},weight_decay={decay}]",
            "estimator": estimator,
            "width": width,
            "depth": depth,
            "weight_decay": decay,
            "measure": measure,
            "value": 0.9 - 0.1 * depth - (0.2 if decay == 0 else 0),
            "low": 0.5,
            "high": 0.95,
            "noise_bound": 0.97,
        }
        for width, depth in ((32, 1), (32, 2), (32, 3), (16, 1), (64, 1))
        for decay in (1e-3, 0.0)
        for measure in ("pearson", "spearman")
        for estimator in ("exact", "gnh")
    ]
    paths = basu_fragility(rows, tmp_path, "basu")
    assert sorted(p.name for p in paths) == ["basu.csv", "basu.pdf", "basu.png"]
    root, _ = drawn
    code = main(
        [
            "figures",
            "basu2021-fragility",
            "--out",
            str(tmp_path / "x"),
            "--run",
            str(root / "run"),
            "-q",
        ]
    )
    assert code == 2
    assert "no digits-mlp problem scored" in capsys.readouterr().err
