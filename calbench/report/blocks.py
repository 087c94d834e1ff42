"""Typed report blocks, rendered to Markdown and to one self-contained HTML file.

Both reports (a results folder's, and a `tune` search's) are lists of these blocks, so the
Markdown and the HTML always say the same thing and both are escaped in one place.
"""

from __future__ import annotations

import base64
import html
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from calbench.atomic import write_text_atomic


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    bold: Optional[set[tuple[int, int]]] = None  # (row, column) cells to emphasise


@dataclass
class Image:
    path: Path
    caption: str
    width: Optional[int] = 360  # pixels in the HTML page; None: as wide as the page allows


Block = Union[Heading, Text, Table, Image]

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}figure{display:inline-block;margin:8px}img{max-width:100%}"
)


#: characters that start inline Markdown (emphasis, code, links, strikethrough) or escape one
_MD_PUNCTUATION = str.maketrans({c: "\\" + c for c in "\\`*_[]~|"})
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_escape(text: str) -> str:
    """Plain text as inline Markdown: shown as written, never as HTML, markup, a link or a new line.

    Names and error messages come from users and files; in a table a newline or a pipe
    would also break the row.
    """
    text = " ".join(str(text).splitlines())
    text = text.translate(_MD_PUNCTUATION)
    return "".join(_MD_ENTITIES.get(c, c) for c in text)


def _md_link_target(path: Path, base: Path) -> str:
    """A relative link target, percent-encoded: spaces, brackets and parentheses cannot end the link."""
    return urllib.parse.quote(Path(os.path.relpath(path, base)).as_posix(), safe="/")


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    """Markdown with images referenced relative to ``base`` (the folder the .md file is in); all text escaped."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {md_escape(block.text)}\n")
        elif isinstance(block, Text):
            out.append(md_escape(block.text) + "\n")
        elif isinstance(block, Table):
            bold = block.bold or set()
            out.append("| " + " | ".join(map(md_escape, block.header)) + " |")
            out.append("|" + "---|" * len(block.header))
            for i, row in enumerate(block.rows):
                cells = [f"**{md_escape(c)}**" if (i, j) in bold else md_escape(c) for j, c in enumerate(row)]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        elif isinstance(block, Image):
            out.append(f"![{md_escape(block.caption)}]({_md_link_target(block.path, base)})\n")
    return "\n".join(out)


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"<h{block.level}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        bold = block.bold or set()
        rows = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.header) + "</tr>"]
        for i, row in enumerate(block.rows):
            cells = [
                f"<td><b>{html.escape(c)}</b></td>" if (i, j) in bold else f"<td>{html.escape(c)}</td>"
                for j, c in enumerate(row)
            ]
            rows.append("<tr>" + "".join(cells) + "</tr>")
        return "\n".join(rows) + "</table>"
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    width = f" width='{block.width}'" if block.width else ""
    return f"<figure><img src='data:image/png;base64,{data}'{width} alt='{html.escape(block.caption)}'><figcaption>{html.escape(block.caption)}</figcaption></figure>"


def render_html(blocks: Sequence[Block], title: str) -> str:
    """One HTML file with inline CSS and images embedded as base64 PNG."""
    head = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
    return "\n".join([head, *(_html_block(b) for b in blocks), "</body></html>"]) + "\n"


def write_report(blocks: Sequence[Block], folder: Path, title: str) -> tuple[Path, Path]:
    """Write ``folder``/report.md and the self-contained ``folder``/report.html, atomically."""
    md, page = Path(folder) / "report.md", Path(folder) / "report.html"
    write_text_atomic(md, render_markdown(blocks, Path(folder)))
    write_text_atomic(page, render_html(blocks, title))
    return md, page
