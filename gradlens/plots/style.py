"""The figure conventions of :mod:`gradlens.plots` that other subsystems draw with.

The helpers live in the private ``gradlens.plots._util``; what others need of them is re-exported
here, so that no other subpackage imports a private plots module (tests/test_layering.py):
:mod:`gradlens.sinks` (the heatmap images it logs) uses :data:`ANNOTATE_MAX`,
:data:`CONFLICT_CMAP`, :func:`new_figure` and :func:`text`, and :mod:`gradlens.report` uses
:func:`size_label`. Needs the ``plot`` extra only for :func:`new_figure`.

Example:
    >>> text("cost $5"), size_label("model.n_params", 12345), CONFLICT_CMAP
    ('cost \\\\$5', '12.3k params', 'RdBu')
"""

from __future__ import annotations

from gradlens.plots._util import ANNOTATE_MAX, CONFLICT_CMAP, new_figure, size_label, text

__all__ = ["ANNOTATE_MAX", "CONFLICT_CMAP", "new_figure", "size_label", "text"]
