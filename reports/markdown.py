"""The Markdown report: the tables of the HTML report, with figure links."""

from __future__ import annotations

import html
import unicodedata
from typing import Any

from reports import tables
from reports.tables import Table


def md_escape(text: object) -> str:
    """Escape a string from data or configuration for a Markdown table cell."""
    escaped = html.escape(str(text), quote=True)
    for char in "\\|`*_[]":
        escaped = escaped.replace(char, "\\" + char)
    return escaped.replace("\n", " ")


def terminal_escape(text: object) -> str:
    """A string from data made safe to print on a terminal: control characters (which can carry
    terminal escape sequences) shown as ``\\xNN``, line breaks as spaces; nothing else changes,
    so a sentence reads as written."""
    out = []
    for char in str(text):
        if char in "\r\n":
            out.append(" ")
        elif unicodedata.category(char) == "Cc" and char != "\t":
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def _cell(cell: str) -> str:
    return cell if tables.is_formatted_number(cell) else md_escape(cell)


def table_lines(table: Table | None, *, title: bool = True) -> list[str]:
    if table is None or not table.rows:
        return []
    lines = [""]
    if title:
        lines += [f"### {md_escape(table.title)}", ""]
    if table.note:
        lines += [md_escape(table.note), ""]
    lines.append("| " + " | ".join(md_escape(cell) for cell in table.header) + " |")
    lines.append("|" + "---|" * len(table.header))
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in table.rows]
    return lines


def render_markdown(
    results: dict[str, Any],
    figures: dict[str, dict[str, str]],
    per_test: dict[str, Table] | None = None,
    history: list[Any] | None = None,
) -> str:
    """``figures``: per problem, figure kind -> path relative to the run directory."""
    suite = results["suite"]
    confidence = suite["metrics"]["confidence"]
    lines = [
        f"# fidelity report: {md_escape(suite['name'])}",
        "",
        f"Created {md_escape(results['created'])}"
        f" · fidelity {md_escape(results['fidelity_version'])}"
        f" · git {md_escape(results.get('git_revision') or 'n/a')}"
        f" · total {results['timings']['total_seconds']:.1f} s",
        "",
        "delta[t, j] = change of test loss t when training point j is removed (positive: j "
        f"helped). Intervals: {confidence:.0%} two-way bootstrap over test and removed points "
        f"({suite['metrics']['bootstrap']} replicates). Noise ceiling: split-half reliability of "
        "a multi-seed response (Spearman-Brown corrected); '-' for one seed.",
    ]
    lines += table_lines(tables.summary_table(results))
    if history:
        lines += table_lines(tables.trend_table(results, history))
    for name, problem in results["problems"].items():
        lines += ["", f"## {md_escape(name)}", "", md_escape(tables.problem_header(problem))]
        lines += table_lines(tables.metrics_table(problem))
        warnings = tables.estimator_warnings(problem)
        if warnings:
            lines += ["", "Warnings:", ""] + [f"- {md_escape(w)}" for w in warnings]
        lines += table_lines(tables.conformance_table(problem))
        lines += table_lines(tables.agreement_table(problem))
        lines += table_lines(tables.influential_table(problem))
        lines += table_lines((per_test or {}).get(name))
        lines += table_lines(tables.decomposition_table(problem))
        lines += table_lines(tables.diagnostics_table(problem))
        lines += table_lines(tables.timing_table(problem))
        for kind, path in figures.get(name, {}).items():
            lines += ["", f"![{md_escape(kind)} for {md_escape(name)}]({path})"]
    lines += table_lines(tables.configuration_table(results))
    return "\n".join(lines) + "\n"
