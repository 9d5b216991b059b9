"""The run store: one directory per run, written crash-safe while training, read back as pandas.

Layout of a run directory (format version :data:`FORMAT_VERSION`)::

    meta.json                      tasks, engine, layers, weights, seed, model, config, versions ...
    steps/chunk-000000.parquet     [step, layer, task_i, task_j, gram]: upper triangle (i <= j) of
                                   every layer's Gram, layer ``"total"`` for the total
    scalars/chunk-000000.parquet   [step, task, weight, loss]: the same steps' weights and losses
    probes/chunk-000000.parquet    [step, engine, level, weighting, weighting_path, rules, timings,
                                   unreached, notes, layer_weights]: the rest of each Snapshot
    evals/chunk-000000.parquet     [point, epoch, step, split, task, metric, value]
    commits.json                   how many steps and evals chunks are committed
    .lock                          the live writer's pid, host and start time

:class:`RunWriter` buffers the current chunk of probed steps in memory and writes it every
``flush_every`` steps or ``flush_seconds`` seconds; each file is written under a temporary name and
renamed into place, and the ``scalars`` and ``probes`` chunks are always renamed before their
``steps`` chunk, which is the commit point. A run killed at any instant therefore reads back every
step of its last committed chunk and nothing torn. Evals are written as soon as they are added.
Each chunk carries a header (index, tasks, steps) that the reader checks against its file name,
``meta.json`` and the commit record (see :mod:`gradlens.store._check`); ``RunWriter(...,
append=True)`` continues a run whose writer died and :meth:`RunWriter.rewind` cuts one back to a
step (:mod:`gradlens.store._append`).


:func:`load_run` reads one run (also while it is being written), :func:`load_runs` tabulates many
runs (meta flattened + final evals) for cross-run analysis; ``gradlens.stats`` builds its tables
from these two. Runs written in format 1 (total ``"__all__"``, no probes) still read, the total
renamed. The writer is :mod:`gradlens.store.writer`, the reader :mod:`gradlens.store.reader`; the
files and checks are in the private ``_io``, ``_lock``, ``_check`` and ``_append``.

Example:
    >>> import tempfile, torch
    >>> from gradlens import Snapshot
    >>> d = tempfile.mkdtemp()
    >>> with RunWriter(d + "/run", meta={"tasks": ["a", "b"], "seed": 0}) as w:
    ...     for step in range(3):
    ...         g = torch.tensor([[4.0, -2.0], [-2.0, 1.0 + step]], dtype=torch.float64)
    ...         w.add_snapshot(Snapshot(step, ("a", "b"), g, {"fc": g}, torch.ones(2)))
    ...     w.add_eval({"a": {"accuracy": 0.9}, "b": {"accuracy": 0.7}}, split="val", point="final")
    >>> run = load_run(d + "/run")
    >>> run.tasks, run.layers, len(run.steps)
    (('a', 'b'), ('total', 'fc'), 18)
    >>> run.gram(2).tolist()
    [[4.0, -2.0], [-2.0, 3.0]]
    >>> load_runs(d)[["run_id", "seed", "final.val.b.accuracy"]].to_dict("records")
    [{'run_id': 'run', 'seed': 0, 'final.val.b.accuracy': 0.7}]
"""

from __future__ import annotations

from gradlens.store._io import FORMAT_VERSION
from gradlens.store.reader import Run, load_run, load_runs
from gradlens.store.writer import RunWriter

__all__ = ["FORMAT_VERSION", "Run", "RunWriter", "load_run", "load_runs"]
