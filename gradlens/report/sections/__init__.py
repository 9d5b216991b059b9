"""The sections of a sweep's report (internal to :mod:`gradlens.report`), one module per family:

- ``task_set``: one section per set of jointly trained tasks, its figures, and the parts below;
- ``associations``: correlations across runs (primary and secondary test families);
- ``optimum``: the optimal weight per model size and its trend;
- ``gain``: joint minus single-task training at a weight chosen on held-out seeds;
- ``within``: per-epoch conflict against the validation metric inside runs, pooled;
- ``_common``: options, the summary's findings, words, figures.

The methods-as-arms section is :mod:`gradlens.report._arms`; the HTML and Markdown renderer is
:mod:`gradlens.report._render`; :func:`gradlens.report.build_report` assembles them.

Each part defers its claims to :class:`Findings`, which sorts them once every test family of the
report is known, each family at ``alpha`` over the number of families (Bonferroni):

Example:
    >>> from gradlens.report.sections import Findings
    >>> found = Findings()
    >>> def claim(name, p):
    ...     return lambda level: ([f"{name} holds"], []) if p < level else ([], [f"{name}: no"])
    >>> found.defer("a", 0.01, claim("A", 0.01))
    >>> found.defer("b", 0.04, claim("B", 0.04))
    >>> found.resolve(alpha=0.05)["level_per_family"]
    0.025
    >>> [line.split(" [")[0] for line in found.supported], found.unsupported
    (['A holds'], ['B: no'])
"""

from __future__ import annotations

from gradlens.report.sections._common import Findings, Options
from gradlens.report.sections.task_set import task_set_section

__all__ = ["Findings", "Options", "task_set_section"]
