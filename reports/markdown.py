"""The Markdown report: the tables of the HTML report, with figure links."""

from __future__ import annotations

import html
import unicodedata

from reports import tables
from reports.document import Block, Figure, Heading, Paragraph, Preformatted, TableBlock, Warnings
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


def render_markdown(blocks: list[Block]) -> str:
    """The report's outline as Markdown; figures become image links."""
    lines: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["", f"{'#' * block.level} {md_escape(block.text)}"]
        elif isinstance(block, Paragraph):
            lines += ["", md_escape(block.text)]
        elif isinstance(block, Warnings):
            lines += ["", "Warnings:", ""] + [f"- {md_escape(item)}" for item in block.items]
        elif isinstance(block, TableBlock):
            lines += table_lines(block.table)
        elif isinstance(block, Figure):
            lines += ["", f"![{md_escape(block.caption)}]({block.path})"]
        elif isinstance(block, Preformatted):
            # Raw configuration stays out of Markdown (a code fence shows markup unescaped
            # to a reader that ignores fences); results.json holds it.
            lines += ["", md_escape(block.caption)]
    return "\n".join(lines).lstrip("\n") + "\n"
