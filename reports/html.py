"""The self-contained HTML report: one file, figures embedded as data URIs, no scripts, no
network. Every string from data or configuration passes through ``html.escape``."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from reports import tables
from reports.tables import Table

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.5rem; border-bottom: 2px solid #ddd; }
h3 { margin-top: 1.6rem; font-size: 1.05rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.82rem; }
th, td { border: 1px solid #d0d0d0; padding: 0.25rem 0.5rem; text-align: left;
         vertical-align: top; }
th { background: #f2f4f7; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption, p.note { color: #555; font-size: 0.82rem; }
.warning { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.4rem 0.8rem; }
pre { background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.78rem; }
nav a { margin-right: 1rem; }
"""


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def table_html(table: Table | None) -> str:
    if table is None or not table.rows:
        return ""
    parts = [f"<h3>{escape(table.title)}</h3>"]
    if table.note:
        parts.append(f'<p class="note">{escape(table.note)}</p>')
    parts.append("<table><thead><tr>")
    parts += [f"<th>{escape(cell)}</th>" for cell in table.header]
    parts.append("</tr></thead><tbody>")
    for row in table.rows:
        cells = [
            f'<td class="num">{escape(c)}</td>'
            if tables.is_formatted_number(c)
            else f"<td>{escape(c)}</td>"
            for c in row
        ]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def figure_html(path: Path, caption: str) -> str:
    """An embedded PNG (a data URI, so the report is one file)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


FIGURE_CAPTIONS = {
    "scatter": "Predicted vs actual change in test loss for every removed point (Koh & Liang "
    "2017, Fig. 2); dashed: y = x",
    "heatmap": "Pooled Pearson correlation between every estimator and response stage",
    "per-test": "Per-test-point correlations over the removed points (one dot per test point)",
    "decomposition": "Gap decomposition along the response ladder (Bae et al. 2022)",
}


def render_html(
    results: dict[str, Any],
    run_dir: Path,
    figures: dict[str, dict[str, str]],
    per_test: dict[str, Table] | None = None,
    history: list[Any] | None = None,
    trend_figure: str | None = None,
) -> str:
    """The report of one run; ``figures`` maps problem -> figure kind -> path in ``run_dir``."""
    suite = results["suite"]
    confidence = suite["metrics"]["confidence"]
    title = f"fidelity report: {suite['name']}"
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p>Created {escape(results['created'])} · fidelity "
        f"{escape(results['fidelity_version'])} · git "
        f"{escape(results.get('git_revision') or 'n/a')} · total "
        f"{results['timings']['total_seconds']:.1f} s</p>",
        "<p>delta[t, j] = change of test loss t when training point j is removed (positive: j "
        f"helped). Intervals: {confidence:.0%} two-way bootstrap over test and removed points "
        f"({escape(suite['metrics']['bootstrap'])} replicates). Noise ceiling: split-half "
        "reliability of a multi-seed response (Spearman-Brown corrected); '-' for one seed.</p>",
        "<nav>"
        + "".join(f'<a href="#{_anchor(name)}">{escape(name)}</a>' for name in results["problems"])
        + '<a href="#configuration">configuration</a></nav>',
        table_html(tables.summary_table(results)),
    ]
    if history:
        body.append("<h2>Trends</h2>")
        if trend_figure:
            body.append(figure_html(run_dir / trend_figure, "Pooled Pearson over recent runs"))
        body.append(table_html(tables.trend_table(results, history)))
    for name, problem in results["problems"].items():
        body += [
            f'<h2 id="{_anchor(name)}">{escape(name)}</h2>',
            f"<p>{escape(tables.problem_header(problem))}</p>",
        ]
        description = problem.get("description")
        if description:
            body.append(f'<p class="note">{escape(description)}</p>')
        warnings = tables.estimator_warnings(problem)
        if warnings:
            items = "".join(f"<li>{escape(w)}</li>" for w in warnings)
            body.append(f'<div class="warning"><strong>Warnings</strong><ul>{items}</ul></div>')
        body.append(table_html(tables.metrics_table(problem)))
        shown = figures.get(name, {})
        for kind in ("scatter", "heatmap", "per-test"):
            if kind in shown:
                body.append(figure_html(run_dir / shown[kind], FIGURE_CAPTIONS[kind]))
        body.append(table_html((per_test or {}).get(name)))
        body.append(table_html(tables.conformance_table(problem)))
        body.append(table_html(tables.agreement_table(problem)))
        body.append(table_html(tables.influential_table(problem)))
        if "decomposition" in shown:
            body.append(
                figure_html(run_dir / shown["decomposition"], FIGURE_CAPTIONS["decomposition"])
            )
        body.append(table_html(tables.decomposition_table(problem)))
        body.append(table_html(tables.diagnostics_table(problem)))
        body.append(table_html(tables.timing_table(problem)))
    body += [
        '<h2 id="configuration">Configuration and environment</h2>',
        table_html(tables.configuration_table(results)),
        "<h3>Suite</h3>",
        f"<pre>{escape(json.dumps(results['suite'], indent=2, default=str))}</pre>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


def _anchor(name: str) -> str:
    return "p-" + "".join(c if c.isalnum() else "-" for c in name)
