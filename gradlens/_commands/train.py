"""``gradlens train``: train one model with the profiler attached and store the run."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

NAME = "train"
HELP = "Train one multi-task (or single-task) model with the profiler attached; store the run."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for the TrainConfig fields; a flag overrides the same field of ``--config``."""
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file of TrainConfig fields (top level, or a [train] table)",
    )
    p.add_argument("--dataset", default=None, help="dataset name (default multidigits)")
    p.add_argument(
        "--data-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a dataset option, repeatable; VALUE is read as JSON when it parses (n=512)",
    )
    p.add_argument("--tasks", default=None, help="comma-separated tasks (default: all)")
    p.add_argument("--model", default=None, help="model family: mlp, resnet or vit")
    p.add_argument("--width", type=float, default=None, help="width multiplier")
    p.add_argument("--depth", type=int, default=None, help="depth (default: the family's)")
    p.add_argument(
        "--weights",
        default=None,
        metavar="A=W,B=W",
        help="loss weights (multi-domain: sampling probabilities), normalised; default uniform",
    )
    p.add_argument(
        "--weighting",
        default=None,
        help="a multi-task optimization method instead of --weights (gradlens.weightings."
        "METHODS: upgrad, mgda, pcgrad, imtl_g, aligned_mtl, dualproj, cagrad, nash_mtl, "
        "uncertainty, rlw, dwa)",
    )
    p.add_argument(
        "--per-layer",
        action="store_true",
        default=None,
        help="apply a Gram --weighting to each layer's own Gram",
    )
    p.add_argument("--optimizer", default=None, help="adam or sgd")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=None, help="weight decay")
    p.add_argument("--batch-size", type=int, default=None, help="batch size")
    p.add_argument("--epochs", type=int, default=None, help="epochs")
    p.add_argument("--seed", type=int, default=None, help="seed")
    p.add_argument(
        "--engine",
        default=None,
        help="profiler engine (auto: the default, the fastest exact one, timed; gramian, "
        "batched, loop, features)",
    )
    p.add_argument("--every", default=None, help="probe every k-th step, or log / log:N")
    p.add_argument(
        "--early-stopping", type=int, default=None, metavar="PATIENCE", help="patience in epochs"
    )
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory (default runs/train-<date>-<time>)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument(
        "--yes",
        action="store_true",
        help="confirm a model beyond the size bound (over 10^8 parameters or 64 blocks)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def run(args: argparse.Namespace) -> int:
    """Train, store the run and print the final metrics."""
    import torch

    from gradlens._validate import check_int
    from gradlens.train import format_metrics, train

    fields: dict[str, Any] = _read_config(args.config) if args.config is not None else {}
    if args.data_option:
        options = dict(fields.get("dataset_options") or {})
        options.update(_parse_options(args.data_option))
        fields["dataset_options"] = options
    flags = {
        "dataset": args.dataset,
        "model": args.model,
        "width": args.width,
        "depth": args.depth,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "engine": args.engine,
        "early_stopping": args.early_stopping,
        "device": args.device,
        "weighting": args.weighting,
        "per_layer": args.per_layer,
    }
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.tasks is not None:
        fields["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.weights is not None:
        fields["weights"] = _parse_weights(args.weights)
    if args.every is not None:
        fields["every"] = int(args.every) if args.every.strip().isdigit() else args.every.strip()
    if args.threads is not None:
        check_int("--threads", args.threads, minimum=1)
        fields["threads"] = args.threads  # recorded with the run: its numbers depend on it
    out = args.out
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"train-{stamp}"
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = train(
            fields, out, progress=not args.no_progress, overwrite=args.overwrite, yes=args.yes
        )
    finally:
        torch.set_num_threads(threads)
    stopped = " (stopped early)" if result.stopped_early else ""
    epochs = f"{result.epochs_run} epoch{'s' * (result.epochs_run != 1)}"
    sys.stdout.write(
        f"{format_metrics(result.metrics)}\n\n"
        f"{epochs}{stopped}; run stored in {result.run_dir} "
        f'(gradlens.load_run("{result.run_dir}"))\n'
    )
    return 0


def _read_config(path: Path) -> dict[str, Any]:
    from gradlens._errors import GradlensError

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GradlensError(f"`--config` should be a TOML file; found no file {path}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise GradlensError(f"`--config` {path} is not valid TOML: {exc}.") from None
    if isinstance(data.get("train"), dict):
        return dict(data["train"])
    return dict(data)


def _parse_weights(text: str) -> dict[str, float]:
    from gradlens._errors import GradlensError

    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise GradlensError(
                f"`--weights` should look like left=0.3,right=0.7; found {text!r}."
            ) from None
    return out


def _parse_options(items: list[str]) -> dict[str, Any]:
    from gradlens._errors import GradlensError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GradlensError(f"`--data-option` should look like KEY=VALUE; found {item!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
