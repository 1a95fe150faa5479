import re
from dataclasses import replace

from fidelity.reports.document import outline
from fidelity.reports.format import format_interval
from fidelity.reports.markdown import md_escape, render_markdown
from fidelity.reports.tables import estimator_warnings
from fidelity.results import EstimatorRecord, Interval
from tests.fakes import fake_problem, fake_results


def test_markup_from_data_is_escaped():
    text = '<script>alert(1)</script><img src=x onerror="alert(2)"> | `x`'
    escaped = md_escape(text)
    assert "<" not in escaped and ">" not in escaped
    assert "\\|" in escaped and "\\`" in escaped
    assert '"' not in escaped


def test_interval_formatting():
    assert format_interval(Interval(0.5, 0.4, 0.6)) == "0.5000 [0.4000, 0.6000]"
    assert format_interval(Interval(0.5)) == "0.5000"
    assert format_interval(Interval(None)) == "n/a"
    assert format_interval(None) == "n/a"


def test_report_escapes_names_from_configuration():
    metric = Interval(0.9, 0.8, 0.95)
    names = ("pearson", "spearman", "kendall", "mean_test_pearson", "mean_test_spearman")
    problem = fake_problem(
        "p<img onerror=x>", {"<i>est</i>": {"cold": dict.fromkeys(names, metric)}}
    )
    problem = replace(problem, top_by="<b>x</b>", description="<img src=y>")
    results = replace(
        fake_results(),
        suite={"name": "<script>s</script>", "metrics": {"confidence": 0.95, "bootstrap": 10}},
        problems={problem.name: problem},
    )
    text = render_markdown(outline(results, {}))
    for raw in ("<script>", "<i>", "<b>", "<img"):
        assert raw not in text
    assert "| &lt;i&gt;est&lt;/i&gt; | cold | 0.9000 [0.8000, 0.9500]" in text


def test_solver_warnings_are_listed():
    diagnostics = {
        "negative_curvature_columns": 2,
        "unconverged_columns": 1,
        "max_relative_residual": 0.3,
    }
    problem = fake_problem("p", {"cg": {"cold": {}}})
    warned = replace(problem, estimators={"cg": EstimatorRecord("cg", {}, diagnostics, 0.1, 0.1)})
    found = estimator_warnings(warned)
    assert len(found) == 2 and "non-positive curvature" in found[0] and "3.00e-01" in found[1]
    assert estimator_warnings(problem) == []


HOSTILE = (
    "visit http://evil.example/a?b=1 or www.evil.example, mail bad@evil.example",
    "# heading\r## injected\n> quote",
    "1. a list",
    "![img](http://evil.example/x.png) [link](http://evil.example)",
    "a|b | c\r|---|",
    "\x1b[31mred\x07 \x00nul \u202eevil\u202c \u200bzero",
    "<https://evil.example> <mailto:x@y.z>",
    "`x@y.example` ``",
)


def rendered_with_gfm(text: str) -> list[str]:
    """report.md rendered by cmark-gfm (GitHub's renderer, autolinks on) and by markdown-it
    with linkify: both HTML strings."""
    import cmarkgfm
    from markdown_it import MarkdownIt

    return [cmarkgfm.github_flavored_markdown_to_html(text), MarkdownIt("gfm-like").render(text)]


def test_no_link_image_heading_or_control_character_comes_from_data():
    metric = Interval(0.9, 0.8, 0.95)
    names = ("pearson", "spearman", "kendall", "mean_test_pearson", "mean_test_spearman")
    metrics = {label: {"cold": dict.fromkeys(names, metric)} for label in HOSTILE}
    problem = replace(fake_problem("problem", metrics), description=" ".join(HOSTILE))
    results = replace(fake_results(), problems={problem.name: problem})
    text = render_markdown(outline(results, {}))
    for html in rendered_with_gfm(text):
        links = re.findall(r"<a [^>]*>", html)
        assert all('href="#' in link for link in links)  # the contents' own links only
        assert "<img" not in html and "<blockquote" not in html and "<ol" not in html
        headings = re.findall(r"<h[1-6][^>]*>(.*?)</h[1-6]>", html, flags=re.S)
        assert not [h for h in headings if "injected" in h or "heading" in h or "evil" in h]
        assert "evil.example" in html  # shown, as text
    for char in "\x1b\x07\x00\u202e\u202c\u200b\r":
        assert char not in text
    assert "\\u202e" in text and "\\x1b" in text
    for label in HOSTILE:  # one table row per estimator: no cell broke its row
        assert sum(line.startswith("| ") and "cold" in line for line in text.splitlines()) >= 8
        del label


def test_terminal_output_shows_control_and_bidirectional_characters():
    from fidelity.reports.markdown import terminal_escape

    shown = terminal_escape("a\x1b[2Jb\u202ec\r\nd\u2028e")
    assert shown == "a\\x1b[2Jb\\u202ec  d e"


def test_dollar_signs_from_data_are_not_math():
    # GitHub renders $...$ as math; a label such as "$x^$" must read as written.
    assert md_escape("$x^$ 50$") == "\\$x^\\$ 50\\$"
