"""report.md: user strings (task names, config values) never render as links, images or HTML."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlens.report._render import Figure, Section, Table, md_text, render_markdown

markdown_it = pytest.importorskip("markdown_it")  # in the dev extra

PAYLOADS = [
    "![p](http://evil.example/t.png)",
    "[c](javascript:alert(1))",
    "<img src=x onerror=alert(1)>",
    "<http://evil.example>",
    "http://evil.example/bare",
    "www.evil.example",
    "[ref]: http://evil.example",
    "**bold** _em_ `code` # h",
    "a|b\nc",
    "\\[escaped\\](x)",
]


def _render(md: str) -> str:
    parser = markdown_it.MarkdownIt("commonmark").enable("table")
    if _has_linkify():
        parser = parser.enable("linkify")
        parser.options["linkify"] = True
    return parser.render(md)


def _has_linkify() -> bool:
    try:
        import linkify_it  # noqa: F401
    except ImportError:
        return False
    return True


def _report(name: str) -> str:
    table = Table(f"caption {name}", ["task", name], [[name, "0.5"]])
    fig = Figure("set1-heatmap.png", b"", f"heatmap of {name}")
    sec = Section(f"Tasks {name}, right", [f"Paragraph about {name}."], [fig], [table])
    return render_markdown(f"report {name}", [f"meta {name}"], [name], [name], [sec], "figures")


def _links(html: str) -> list[str]:
    """Every live element (link, image, script) and every URL attribute of the rendered HTML."""
    tags = re.findall(r"<(?:a|img|script|iframe)\b[^>]*>", html)
    return tags + re.findall(r"(?:src|href)=\"([^\"]*)\"", html)


@pytest.mark.parametrize("name", PAYLOADS)
def test_payloads_render_as_text_everywhere(name):
    found = _links(_render(_report(name)))
    # the only live element is the report's own figure, whatever the task is called
    assert len(found) == 2
    assert found[0].startswith('<img src="figures/set1-heatmap.png" alt="heatmap of ')
    assert found[1] == "figures/set1-heatmap.png"


@settings(max_examples=200)
@given(st.text(alphabet=st.sampled_from(list("[]()!<>:/*_`|#\\ ahjstvw.e\n")), max_size=40))
def test_no_generated_string_opens_a_link(text):
    html = _render(f"| {md_text(text)} |\n|---|\n| {md_text(text)} |\n\n{md_text(text)}\n")
    assert _links(html) == []
