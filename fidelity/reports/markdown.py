"""The Markdown report: the tables of the HTML report, with figure links."""

from __future__ import annotations

import html
import re
import unicodedata

from fidelity.reports import tables
from fidelity.reports.document import (
    Block,
    Figure,
    Heading,
    Paragraph,
    Preformatted,
    TableBlock,
    Warnings,
)
from fidelity.reports.tables import Table

#: Characters that end a line in some renderer or terminal: shown as one space.
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
# A whitespace-free run that some Markdown flavour would turn into a link: a scheme's "://", a
# "www." or an e-mail's "@" (GFM autolinks all three; cmark-gfm finds e-mails after entities
# are decoded, so only a code span keeps them inert).
LINKISH = re.compile(r"\S*(?:://|@|\bwww\.)\S*", re.IGNORECASE)
# What opens a block at the start of a line: a list number, a heading, quote or bullet marker.
LEADING_BLOCK = re.compile(r"^(\d+)([.)])|^([#>+=-])")


def visible(text: object) -> str:
    """``text`` with every line break as a space and every control or format character (ANSI
    escapes, NUL, BEL, bidirectional overrides such as U+202E, zero-width characters) shown as
    its code, ``\\xNN`` or ``\\uNNNN``; everything else, tabs included, unchanged."""
    out = []
    for char in str(text):
        if char in LINE_BREAKS:
            out.append(" ")
        elif char == "\t":
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Co", "Cs"):
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def _escape_plain(text: str) -> str:
    escaped = html.escape(text, quote=True)
    # "$" too: GitHub renders $...$ as math.
    for char in "\\|`*_[]~$":
        escaped = escaped.replace(char, "\\" + char)
    return escaped


def _code_span(token: str) -> str:
    """``token`` as an inline code span (never a link), pipes escaped for a table cell."""
    longest = max((len(run) for run in re.findall(r"`+", token)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if token.startswith("`") or token.endswith("`") else ""
    cell = token.replace("|", "\\|")
    return f"{fence}{pad}{cell}{pad}{fence}"


def md_escape(text: object) -> str:
    """A string from data or configuration made inert Markdown, for a table cell, heading or
    paragraph: line breaks and control/bidirectional characters as in ``visible``; Markdown and
    HTML punctuation escaped (so no emphasis, link, image, HTML or heading comes from data); a
    word a renderer would autolink (``http://...``, ``www.``, an e-mail address) kept as an
    inline code span; a leading ``1.`` not taken for a list."""
    shown = visible(text)
    parts, last = [], 0
    for match in LINKISH.finditer(shown):
        parts += [_escape_plain(shown[last : match.start()]), _code_span(match.group())]
        last = match.end()
    parts.append(_escape_plain(shown[last:]))
    return LEADING_BLOCK.sub(_escape_leading, "".join(parts).lstrip(" "), count=1)


def _escape_leading(match: re.Match[str]) -> str:
    if match.group(3):
        return "\\" + match.group(3)
    return f"{match.group(1)}\\{match.group(2)}"


def terminal_escape(text: object) -> str:
    """A string from data made safe to print on a terminal: control and format characters
    (which can carry terminal escape sequences or reorder the line) shown as their codes, line
    breaks as spaces (``visible``); nothing else changes, so a sentence reads as written."""
    return visible(text)


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
