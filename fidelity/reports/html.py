"""The self-contained HTML report: one file, figures embedded as data URIs, no scripts, no
network. Every string from data or configuration passes through ``html.escape``."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from fidelity.reports import tables
from fidelity.reports.document import (
    Block,
    Contents,
    Figure,
    Heading,
    Paragraph,
    Preformatted,
    TableBlock,
    Warnings,
)
from fidelity.reports.tables import Table

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
            if table.align_numbers and tables.is_formatted_number(c)
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


def render_html(blocks: list[Block], run_dir: Path) -> str:
    """The report's outline as one self-contained page; figures are read from ``run_dir``."""
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1), "fidelity")
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            at = f' id="{escape(block.anchor)}"' if block.anchor else ""
            body.append(f"<h{block.level}{at}>{escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(
                f'<p class="note">{escape(block.text)}</p>'
                if block.note
                else f"<p>{escape(block.text)}</p>"
            )
        elif isinstance(block, Warnings):
            items = "".join(f"<li>{escape(item)}</li>" for item in block.items)
            body.append(f'<div class="warning"><strong>Warnings</strong><ul>{items}</ul></div>')
        elif isinstance(block, TableBlock):
            body.append(table_html(block.table))
        elif isinstance(block, Figure):
            body.append(figure_html(run_dir / block.path, block.caption))
        elif isinstance(block, Contents):
            links = "".join(f'<a href="#{escape(a)}">{escape(text)}</a>' for a, text in block.links)
            body.append(f"<nav>{links}</nav>")
        elif isinstance(block, Preformatted):
            body.append(f"<pre>{escape(block.text)}</pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )
