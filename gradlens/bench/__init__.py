"""Benchmark of the engines against a plain scalarized step and the per-task loop.

Everything is measured in one process, interleaved (each repeat times every method once, in a
rotating order), and reported as ratios of medians to the plain step ``(w @ stack(L)).backward()``
on the same model and batch. A profiled method is timed on the probe after ``warm_probes`` untimed
ones of a fresh profiler (its first probes allocate the engine's buffers), as in a training run;
``auto`` after ``warm_probes`` untimed probes of the engine it chose. Peers: a LibMTL-style
per-task loop (T ``autograd.grad`` calls, flatten, Gram, weighted gradient written back) and, when
``torchjd`` is installed, TorchJD's Gramian engine (``torchjd.autogram.Engine.compute_gramian``
then the weighted backward, as its documentation shows). Peak memory is measured in a fresh
process per method (``--memory``): resident-memory growth on CPU,
``torch.cuda.max_memory_allocated`` growth on a CUDA device.

Everything runs on one ``device`` ("cpu", "cuda" or "cuda:N"); on CUDA each timed step is
bracketed by ``torch.cuda.synchronize()``, so the clock reads when the device has finished.

Example:
    >>> from gradlens.bench import run_benchmark
    >>> rows = run_benchmark(models=["mlp-tiny"], tasks=[2], methods=["plain", "gramian"],
    ...                      repeats=2, batch=16, amortise=())
    >>> sorted({r["method"] for r in rows})
    ['gramian', 'plain']
    >>> rows[0]["device"]
    'cpu'
"""

from gradlens.bench._hardware import hardware_info
from gradlens.bench._memory import measure_peak_memory
from gradlens.bench._models import MODELS
from gradlens.bench._timing import AMORTISED, METHODS, ZOO_MODELS, format_table, run_benchmark
from gradlens.bench._weightings import WEIGHTED_METHODS
from gradlens.bench._zoo import SIZES, ZOO_BATCH, check_size

__all__ = [
    "AMORTISED",
    "METHODS",
    "MODELS",
    "SIZES",
    "WEIGHTED_METHODS",
    "ZOO_BATCH",
    "ZOO_MODELS",
    "check_size",
    "format_table",
    "hardware_info",
    "measure_peak_memory",
    "run_benchmark",
]
