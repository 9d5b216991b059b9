"""``gradlens watch RUN_DIR``: a live terminal view of a run while it is being written.

Each frame shows the run's tasks and writer, the latest probe's cosine of every task pair per
layer (conflict, ``cos < 0``, in red on a colour terminal) with the fraction of pairs in conflict,
and a sparkline of each pair's cosine over all probes (on a fixed ``[-1, 1]`` scale, so rows
compare). The frame is redrawn when a new chunk is committed (the store's commit point is the
rename of a ``steps`` chunk), and the command ends on Ctrl-C, or by itself with ``--until-done``
once the writer has closed the run (its ``.lock`` is gone). ``--once`` prints one frame.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from gradlens._errors import GradlensError
from gradlens._validate import check_int, check_number

NAME = "watch"
HELP = (
    "Live terminal view of a run being written: tasks, latest cosines and conflicts per layer, "
    "a sparkline of each pair's cosine over the probes; redrawn as chunks commit."
)

_BARS = "▁▂▃▄▅▆▇█"
_RED, _RESET, _CLEAR = "\x1b[31m", "\x1b[0m", "\x1b[H\x1b[2J"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``RUN_DIR``, ``--interval``, ``--once``, ``--until-done``, ``--width``, ``--layers``..."""
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run directory to watch")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between checks (2)")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument(
        "--until-done", action="store_true", help="exit once the writer has closed the run"
    )
    p.add_argument("--width", type=int, default=48, help="characters of each sparkline (48)")
    p.add_argument("--layers", type=int, default=12, help="most layers listed (12)")
    p.add_argument("--pairs", type=int, default=12, help="most task pairs listed (12)")
    p.add_argument(
        "--color",
        choices=["auto", "always", "never"],
        default="auto",
        help="red conflicts and a redrawn screen (auto: when stdout is a terminal)",
    )


def writer_status(run_dir: Path) -> str:
    """``"closed"``, ``"live (pid N)"`` or why the lock is stale, from the run's ``.lock``."""
    from gradlens.store.files import LOCK_NAME, pid_alive

    try:
        rec = json.loads((run_dir / LOCK_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "closed"
    except (OSError, ValueError):
        return "live (lock being written)"
    pid, host = rec.get("pid"), rec.get("host")
    if host != socket.gethostname():
        return f"live on {host} (pid {pid}), as far as its lock says"
    if isinstance(pid, int) and pid_alive(pid):
        return f"live (pid {pid})"
    return f"writer gone: pid {pid} is not running (stale lock)"


def sparkline(values: np.ndarray, width: int) -> str:
    """Values in ``[-1, 1]`` as block characters, averaged into at most ``width`` bins (NaN: a
    space).

    Example:
        >>> sparkline(np.array([-1.0, 0.0, 1.0, np.nan]), 10)
        '▁▅█ '
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size > width:
        edges = np.linspace(0, v.size, width + 1).round().astype(int)
        with np.errstate(all="ignore"):
            v = np.array(
                [
                    np.nanmean(v[a:b]) if np.isfinite(v[a:b]).any() else np.nan
                    for a, b in itertools.pairwise(edges)
                ]
            )
    out = []
    for x in v:
        if not np.isfinite(x):
            out.append(" ")
            continue
        k = round((min(max(float(x), -1.0), 1.0) + 1.0) / 2.0 * (len(_BARS) - 1))
        out.append(_BARS[k])
    return "".join(out)


def _cos_cell(x: float, color: bool) -> str:
    text = "   n/a" if not np.isfinite(x) else f"{x:+6.2f}"
    return f"{_RED}{text}{_RESET}" if color and np.isfinite(x) and x < 0 else text


def _layer_name(layer: str) -> str:
    from gradlens._types import TOTAL_LAYER

    return "all shared" if layer == TOTAL_LAYER else layer


def render(
    run_dir: Path,
    *,
    width: int = 48,
    max_layers: int = 12,
    max_pairs: int = 12,
    color: bool = False,
) -> str:
    """One frame of the view of ``run_dir`` (as committed now), as text.

    (Over 80 lines only by this docstring's example, a whole frame; the code is about 60.)

    Example:
        >>> import tempfile, torch, gradlens as gl
        >>> d = tempfile.mkdtemp() + "/run"
        >>> with gl.RunWriter(d, meta={"tasks": ["a", "b"]}) as w:
        ...     for s in range(3):
        ...         g = torch.tensor([[1.0, s - 1.0], [s - 1.0, 1.0]], dtype=torch.float64)
        ...         w.add_snapshot(gl.Snapshot(s, ("a", "b"), g, {"fc": g}, torch.ones(2)))
        >>> print(render(Path(d)).split("\\n", 1)[1])  # doctest: +NORMALIZE_WHITESPACE
        writer: closed
        tasks: a, b   probed steps: 3 (0 .. 2)
        <BLANKLINE>
        latest probe, step 2: cosine of each pair (conflict: cos < 0)
        layer         a|b   in conflict
        all shared  +1.00   0/1
        fc          +1.00   0/1
        <BLANKLINE>
        cosine of each pair over the probes, all shared, scale -1 ▁ .. █ +1
        a|b   ▁▅█   last +1.00   conflict in 1/3 probes
    """
    from gradlens import metrics
    from gradlens.store import load_run

    run = load_run(run_dir)
    tasks = run.tasks
    steps = run.probed_steps
    now = _dt.datetime.now().strftime("%H:%M:%S")
    lines = [
        f"gradlens watch {run_dir}   {now}",
        f"writer: {writer_status(run_dir)}",
        f"tasks: {', '.join(tasks)}   probed steps: {len(steps)}"
        + (f" ({steps[0]} .. {steps[-1]})" if len(steps) else ""),
    ]
    T = len(tasks)
    if not len(steps):
        lines += ["", "no committed chunk yet: waiting for the first flush"]
        return "\n".join(lines) + "\n"
    if T < 2:
        lines += ["", "a single task: no pair to compare"]
        return "\n".join(lines) + "\n"
    cos = metrics.cosine(run.all_grams())  # (S, L, T, T)
    iu, ju = np.triu_indices(T, k=1)
    pair_cos = cos[:, :, iu, ju]  # (S, L, P)
    names = [f"{tasks[i]}|{tasks[j]}" for i, j in zip(iu, ju)]
    latest = pair_cos[-1, 0]
    order = np.argsort(np.where(np.isfinite(latest), latest, np.inf), kind="stable")
    shown = sorted(order[:max_pairs])  # the most conflicting pairs, in task order
    col = max(6, *(len(names[k]) for k in shown))
    layers = list(run.layers)[: max_layers + 1]
    lw = max(len(_layer_name(x)) for x in layers)
    lines += [
        "",
        f"latest probe, step {steps[-1]}: cosine of each pair (conflict: cos < 0)"
        + (f"; the {len(shown)} lowest of {len(names)} pairs" if len(shown) < len(names) else ""),
        "layer".ljust(lw) + " " + " ".join(names[k].rjust(col) for k in shown) + "   in conflict",
    ]
    for li, layer in enumerate(layers):
        row = pair_cos[-1, li]
        ok = np.isfinite(row)
        cells = " ".join(" " * (col - 6) + _cos_cell(row[k], color) for k in shown)
        lines.append(
            f"{_layer_name(layer).ljust(lw)} {cells}   {int((row[ok] < 0).sum())}/{int(ok.sum())}"
        )
    if len(run.layers) > len(layers):
        lines.append(f"... {len(run.layers) - len(layers)} more layers (--layers)")
    lines += ["", "cosine of each pair over the probes, all shared, scale -1 ▁ .. █ +1"]
    nw = max(len(names[k]) for k in shown)
    for k in shown:
        series = pair_cos[:, 0, k]
        ok = np.isfinite(series)
        line = (
            f"{names[k].ljust(nw)}   {sparkline(series, width)}   last "
            f"{_cos_cell(series[-1], color)}   conflict in {int((series[ok] < 0).sum())}/"
            f"{int(ok.sum())} probes"
        )
        lines.append(line)
    return "\n".join(lines) + "\n"


def _signature(run_dir: Path) -> tuple[object, ...]:
    """What changes when a chunk is committed, meta rewritten or the writer closes."""
    from gradlens.store.files import list_chunks

    meta = run_dir / "meta.json"
    return (
        tuple(sorted(list_chunks(run_dir / "steps"))),
        meta.stat().st_mtime_ns if meta.exists() else None,
        (run_dir / ".lock").exists(),
    )


def watch(args: argparse.Namespace, out: TextIO) -> int:
    """The refresh loop (also used by tests with any text stream)."""
    run_dir: Path = args.run_dir
    for name in ("width", "layers", "pairs"):
        check_int(f"--{name}", getattr(args, name), minimum=1)
    check_number("--interval", args.interval, low=0.0, strict_low=True)
    if not (run_dir / "meta.json").is_file():
        raise GradlensError(
            f"`RUN_DIR` should be a run directory (holding meta.json); found {run_dir}."
        )
    color = args.color == "always" or (args.color == "auto" and out.isatty())
    last = None
    while True:
        sig = _signature(run_dir)
        if sig != last:
            frame = render(
                run_dir,
                width=args.width,
                max_layers=args.layers,
                max_pairs=args.pairs,
                color=color,
            )
            out.write((_CLEAR if color else "") + frame + ("" if color else "\n"))
            out.flush()
            last = sig
        if args.once or (args.until_done and not sig[2]):
            return 0
        time.sleep(args.interval)


def run(args: argparse.Namespace) -> int:
    """Watch until Ctrl-C (or the run closes, with ``--until-done``)."""
    try:
        return watch(args, sys.stdout)
    except KeyboardInterrupt:
        sys.stdout.write(os.linesep)
        return 0
