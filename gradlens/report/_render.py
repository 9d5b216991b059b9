"""Rendering of :mod:`gradlens.report` (kept with the plot helpers): escaped HTML and Markdown.

Every user string (task names, configuration values, column names) passes through
:func:`html_text` / :func:`md_text` here; nothing else writes markup.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__: list[str] = []

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12px; margin: .6em 0 1.4em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; }
td.s { text-align: left; }
caption { caption-side: top; text-align: left; font-size: 13px; color: #444; padding: .3em 0; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 13px; color: #444; }
.supported li { color: #1a5e20; }
.unsupported li { color: #8a1c1c; }
.meta { color: #555; font-size: 13px; }
"""


def html_text(value: Any) -> str:
    """Escape any value for HTML text or attributes."""
    return html.escape(str(value), quote=True)


#: Markdown punctuation that a link or an image needs (``[text](url)``, ``![alt](src)``,
#: ``[ref]: url``), and the backslash that could undo an escape.
_MD_SPECIAL = re.compile(r"([\\\[\]])")


def md_text(value: Any) -> str:
    r"""Escape any value for a Markdown table cell or line: HTML-escaped (no raw HTML, no
    ``<...>`` autolink), brackets backslash-escaped (no ``[text](url)`` link, ``![alt](url)``
    image or ``[ref]: url`` definition), ``://`` and ``www.`` broken so no bare URL is
    autolinked, pipes escaped and newlines joined.

    Example:
        >>> print(md_text("![p](http://evil.example/t.png) a|b"))
        !\[p\](http&#58;//evil.example/t.png) a\|b
    """
    text = html.escape(str(value), quote=False)
    text = _MD_SPECIAL.sub(r"\\\1", text).replace("://", "&#58;//").replace("www.", "www&#46;")
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "&#96;")


def num(value: Any, digits: int = 3, signed: bool = False) -> str:
    """A number with ``digits`` significant digits; ``n/a`` for NaN/None; other values as text."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return "n/a"
    if float(x).is_integer() and abs(x) < 1e6 and not signed:
        return str(int(x))
    out = f"{x:.{digits}g}"
    if signed and x >= 0:
        out = "+" + out
    return out


def interval(lo: Any, hi: Any, digits: int = 2) -> str:
    """``[lo, hi]`` or ``n/a``."""
    if num(lo) == "n/a" or num(hi) == "n/a":
        return "n/a"
    return f"[{float(lo):+.{digits}f}, {float(hi):+.{digits}f}]"


def pval(p: Any) -> str:
    """A p-value with 2 significant digits."""
    return num(p, 2)


@dataclass
class Table:
    """A table to render in both formats: header, rows of already formatted strings."""

    caption: str
    header: Sequence[str]
    rows: list[Sequence[Any]]
    text_columns: frozenset[int] = field(default_factory=frozenset)


@dataclass
class Figure:
    """A rendered figure: PNG bytes, file name (relative to the report), caption."""

    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    """One section: heading, paragraphs, bullet lists, tables and figures, in that order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html_text(h)}</th>" for h in t.header)
    body = []
    for row in t.rows:
        cells = "".join(
            f'<td class="s">{html_text(c)}</td>'
            if k in t.text_columns
            else f"<td>{html_text(c)}</td>"
            for k, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return (
        f"<table><caption>{html_text(t.caption)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _md_table(t: Table) -> str:
    lines = [f"*{md_text(t.caption)}*", ""]
    lines.append("| " + " | ".join(md_text(h) for h in t.header) + " |")
    lines.append("|" + "|".join("---" for _ in t.header) + "|")
    for row in t.rows:
        lines.append("| " + " | ".join(md_text(c) for c in row) + " |")
    return "\n".join(lines)


#: The three headings of a report's summary (set by the statistics of gradlens.report).
SUPPORTED = "Supported by the data (tests adjusted for multiplicity)"
UNSUPPORTED = "Not supported: inconclusive, equivalent within a stated margin, or not testable"
DESCRIPTIVE = "Descriptive (estimates, not tested claims)"


def render_html(
    title: str,
    meta_lines: Sequence[str],
    supported: Sequence[str],
    unsupported: Sequence[str],
    sections: Sequence[Section],
    descriptive: Sequence[str] = (),
) -> str:
    """A self-contained HTML page: inline CSS, figures as base64 PNG data URIs, no script."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html_text(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{html_text(title)}</h1>",
    ]
    out += [f'<p class="meta">{html_text(line)}</p>' for line in meta_lines]
    out.append("<h2>Summary</h2>")
    out.append(f"<h3>{SUPPORTED}</h3>")
    out.append(_html_list(supported, "supported"))
    out.append(f"<h3>{UNSUPPORTED}</h3>")
    out.append(_html_list(unsupported, "unsupported"))
    out.append(f"<h3>{DESCRIPTIVE}</h3>")
    out.append(_html_list(descriptive, "descriptive"))
    for sec in sections:
        out.append(f"<h2>{html_text(sec.title)}</h2>")
        out += [f"<p>{html_text(p)}</p>" for p in sec.paragraphs]
        for fig in sec.figures:
            data = base64.b64encode(fig.png).decode("ascii")
            out.append(
                f'<figure><img alt="{html_text(fig.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html_text(fig.caption)}</figcaption></figure>"
            )
        out += [_html_table(t) for t in sec.tables]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _html_list(items: Sequence[str], cls: str) -> str:
    if not items:
        return f'<ul class="{cls}"><li>(nothing)</li></ul>'
    return f'<ul class="{cls}">' + "".join(f"<li>{html_text(i)}</li>" for i in items) + "</ul>"


def render_markdown(
    title: str,
    meta_lines: Sequence[str],
    supported: Sequence[str],
    unsupported: Sequence[str],
    sections: Sequence[Section],
    figure_dir: str,
    descriptive: Sequence[str] = (),
) -> str:
    """The same report in Markdown; figures linked from ``figure_dir``."""
    out = [f"# {md_text(title)}", ""]
    out += [f"{md_text(line)}  " for line in meta_lines]
    out += ["", "## Summary", "", f"### {SUPPORTED}", ""]
    out += [f"- {md_text(s)}" for s in supported] or ["- (nothing)"]
    out += ["", f"### {UNSUPPORTED}", ""]
    out += [f"- {md_text(s)}" for s in unsupported] or ["- (nothing)"]
    out += ["", f"### {DESCRIPTIVE}", ""]
    out += [f"- {md_text(s)}" for s in descriptive] or ["- (nothing)"]
    for sec in sections:
        out += ["", f"## {md_text(sec.title)}", ""]
        for p in sec.paragraphs:
            out += [md_text(p), ""]
        for fig in sec.figures:
            out += [f"![{md_text(fig.caption)}]({figure_dir}/{fig.name})", ""]
            out += [f"*{md_text(fig.caption)}*", ""]
        for t in sec.tables:
            out += [_md_table(t), ""]
    return "\n".join(out).rstrip() + "\n"
