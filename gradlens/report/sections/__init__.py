"""The sections of a sweep's report (internal to :mod:`gradlens.report`), one module per family:

- ``task_set``: one section per set of jointly trained tasks, its figures, and the parts below;
- ``associations``: correlations across runs (primary and secondary test families);
- ``optimum``: the optimal weight per model size and its trend;
- ``gain``: joint minus single-task training at a weight chosen on held-out seeds;
- ``within``: per-epoch conflict against the validation metric inside runs, pooled;
- ``_common``: options, the summary's findings, words, figures.

The methods-as-arms section is :mod:`gradlens.report._arms`; the HTML and Markdown renderer is
:mod:`gradlens.report._render`; :func:`gradlens.report.build_report` assembles them.
"""

from __future__ import annotations

from gradlens.report.sections._common import Findings, Options
from gradlens.report.sections.task_set import task_set_section

__all__ = ["Findings", "Options", "task_set_section"]
