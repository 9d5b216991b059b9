"""TOML configuration of sweeps and PBT: ``[train]``, ``[sweep]``, ``[pbt]``, ``[executor]``.

Every table is validated here, and every error names the ``table.key``, what was expected and
what was found. ``[train]`` is handed to :meth:`gradlens.train.TrainConfig.from_dict`, which
validates its own fields.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from gradlens._errors import GradlensError
from gradlens._validate import check_int, check_number, fail

__all__ = ["ExecutorSpec", "PBTSpec", "SearchConfig", "SweepSpec", "load_config"]

ExecutorKind = Literal["local", "ray"]
EXECUTOR_KINDS: tuple[str, ...] = ("local", "ray")
PBT_INITS: tuple[str, ...] = ("random", "uniform")
PBT_MODES: tuple[str, ...] = ("max", "min")
_TABLES = ("train", "sweep", "pbt", "executor")


#: The largest PBT population accepted: stated up front, as the sweeps' run counts are.
MAX_POPULATION = 1000


def _bad(key: str, expected: str, found: object) -> NoReturn:
    fail(key, expected, repr(found))


def _float(key: str, value: object, low: float, high: float, *, open_low: bool = False) -> float:
    """A finite number in ``[low, high]`` (``(low, high]`` with ``open_low``; no upper bound
    when ``high`` is infinite)."""
    top = None if math.isinf(high) else high
    return check_number(key, value, low=low, high=top, strict_low=open_low)


def _check_keys(table: str, d: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise GradlensError(
            f"`{table}.{unknown[0]}` is not a known key; expected one of {known}, found the "
            f"unknown key(s) {unknown}."
        )


def _table(name: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        _bad(name, "a TOML table", value)
    return dict(value)


@dataclass(frozen=True)
class ExecutorSpec:
    """The ``[executor]`` table: where trials run and where their results go.

    Attributes:
        kind: ``"local"`` (a process pool on this machine, no extra dependency) or ``"ray"``.
        workers: Parallel trials (local: processes, 1 runs in this process; Ray: actors / tasks
            of one CPU each). ``None``: ``min(cpus, 2)`` locally, the cluster's CPUs on Ray.
        address: The Ray cluster address (``"auto"``, ``"ray://host:10001"``); ``None`` starts
            a local Ray instance. Only for ``kind = "ray"``.
        storage: The output directory (results, checkpoints, index); ``--out`` overrides it. On
            a Ray cluster it must be a filesystem every node mounts at the same path.
    """

    kind: ExecutorKind = "local"
    workers: int | None = None
    address: str | None = None
    storage: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExecutorSpec:
        """Validate an ``[executor]`` table.

        Example:
            >>> ExecutorSpec.from_dict({"kind": "local", "workers": 1}).workers
            1
        """
        d = _table("executor", d)
        _check_keys("executor", d, ("kind", "workers", "address", "storage"))
        kind = d.get("kind", "local")
        if kind not in EXECUTOR_KINDS:
            _bad("executor.kind", f"one of {EXECUTOR_KINDS}", kind)
        workers = d.get("workers")
        if workers is not None:
            workers = check_int("executor.workers", workers, minimum=1)
        address = d.get("address")
        if address is not None and (not isinstance(address, str) or not address):
            _bad("executor.address", "a Ray address string", address)
        if address is not None and kind != "ray":
            _bad("executor.address", 'unset unless executor.kind = "ray"', address)
        storage = d.get("storage")
        if storage is not None and (not isinstance(storage, str) or not storage):
            _bad("executor.storage", "a directory path string", storage)
        return cls(kind, workers, address, storage)


@dataclass(frozen=True)
class SweepSpec:
    """The ``[sweep]`` table: weights x model sizes x seeds, plus single-task baselines.

    Exactly one of ``p`` (two tasks: the first task's weight, the second gets ``1 - p``),
    ``grid`` (points per simplex axis, see :func:`~gradlens.search.simplex_grid`) or ``random``
    (that many Dirichlet(``alpha``) draws with ``random_seed``) sets the weights.

    Attributes:
        p: Weights of the first of two tasks, each in ``[0, 1]``.
        grid: Points per simplex axis (>= 2).
        random: Number of random weight vectors (>= 1).
        random_seed: Seed of the random draws.
        alpha: Dirichlet concentration of the random draws.
        sizes: Model sizes, each ``{"width": float, "depth": int}`` (either may be omitted: the
            ``[train]`` value is used); ``None``: the ``[train]`` size only.
        seeds: Training seeds; ``None``: the ``[train]`` seed only.
        baselines: Add one single-task run per task per size and seed: ``tasks = [task]``
            (one head; multi-domain: that domain's samples only), flagged ``baseline_of`` in the
            run's config.
        methods: Multi-task optimization methods as more arms, one run per method per size and
            seed (``TrainConfig.weighting``): names from :data:`gradlens.weightings.METHODS`,
            ``"name/per_layer"`` for a Gram method per layer. With ``methods``, the weights
            (``p``, ``grid``, ``random``) may be left out.
    """

    p: tuple[float, ...] | None = None
    grid: int | None = None
    random: int | None = None
    random_seed: int = 0
    alpha: float = 1.0
    sizes: tuple[dict[str, Any], ...] | None = None
    seeds: tuple[int, ...] | None = None
    baselines: bool = False
    methods: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepSpec:
        """Validate a ``[sweep]`` table.

        Example:
            >>> SweepSpec.from_dict({"p": [0.25, 0.75], "seeds": [0, 1]}).seeds
            (0, 1)
        """
        d = _table("sweep", d)
        known = (
            "p", "grid", "random", "random_seed", "alpha", "sizes", "seeds", "baselines", "methods"
        )  # fmt: skip
        _check_keys("sweep", d, known)
        methods = _methods(d["methods"]) if "methods" in d else None
        chosen = [k for k in ("p", "grid", "random") if k in d]
        if len(chosen) > 1 or (not chosen and methods is None):
            raise GradlensError(
                f"`sweep` should set exactly one of `sweep.p`, `sweep.grid` or `sweep.random` to "
                f"choose the weights (or none beside `sweep.methods`); found {chosen or 'none'}."
            )
        p = None
        if "p" in d:
            raw = d["p"]
            if not isinstance(raw, list) or not raw:
                _bad("sweep.p", "a non-empty list of numbers in [0, 1]", raw)
            p = tuple(_float(f"sweep.p[{i}]", v, 0.0, 1.0) for i, v in enumerate(raw))
            if len(set(p)) != len(p):
                _bad("sweep.p", "distinct values", raw)
        grid = check_int("sweep.grid", d["grid"], minimum=2) if "grid" in d else None
        random = check_int("sweep.random", d["random"], minimum=1) if "random" in d else None
        random_seed = check_int("sweep.random_seed", d.get("random_seed", 0), minimum=0)
        alpha = _float("sweep.alpha", d.get("alpha", 1.0), 0.0, math.inf, open_low=True)
        sizes = None
        if "sizes" in d:
            raw = d["sizes"]
            if not isinstance(raw, list) or not raw:
                _bad("sweep.sizes", "a non-empty list of tables {width, depth}", raw)
            out = []
            for i, s in enumerate(raw):
                if not isinstance(s, Mapping) or not s or set(s) - {"width", "depth"}:
                    _bad(f"sweep.sizes[{i}]", "a table with keys width and/or depth", s)
                size: dict[str, Any] = {}
                if "width" in s:
                    size["width"] = _float(
                        f"sweep.sizes[{i}].width", s["width"], 0.0, math.inf, open_low=True
                    )
                if "depth" in s:
                    size["depth"] = check_int(f"sweep.sizes[{i}].depth", s["depth"], minimum=1)
                out.append(size)
            sizes = tuple(out)
        seeds = None
        if "seeds" in d:
            raw = d["seeds"]
            if not isinstance(raw, list) or not raw:
                _bad("sweep.seeds", "a non-empty list of integers >= 0", raw)
            seeds = tuple(check_int(f"sweep.seeds[{i}]", v, minimum=0) for i, v in enumerate(raw))
            if len(set(seeds)) != len(seeds):
                _bad("sweep.seeds", "distinct seeds", raw)
        baselines = d.get("baselines", False)
        if not isinstance(baselines, bool):
            _bad("sweep.baselines", "true or false", baselines)
        return cls(p, grid, random, random_seed, alpha, sizes, seeds, baselines, methods)

    def n_runs(self, n_tasks: int) -> int:
        """How many runs this sweep plans over ``n_tasks`` tasks, counted without enumerating.

        Example:
            >>> SweepSpec.from_dict({"grid": 5, "seeds": [0, 1], "baselines": True}).n_runs(3)
            36
        """
        from gradlens.search.simplex import grid_size

        if self.p is not None:
            points = len(self.p)
        elif self.grid is not None:
            points = grid_size(n_tasks, self.grid)
        else:  # random draws, or none (methods only)
            points = int(self.random or 0)
        points += n_tasks if self.baselines else 0
        points += len(self.methods or ())
        return points * len(self.sizes or [{}]) * len(self.seeds or [0])


def _methods(raw: object) -> tuple[str, ...]:
    """Validate ``sweep.methods``: method names, ``"name/per_layer"`` for a Gram method."""
    from gradlens.weightings import GRAM_METHODS, METHODS

    expected = f"a non-empty list of distinct methods from {list(METHODS)} (Gram ones may end in "
    expected += "'/per_layer')"
    if not isinstance(raw, list) or not raw or len(set(map(str, raw))) != len(raw):
        _bad("sweep.methods", expected, raw)
    for i, m in enumerate(raw):
        name, sep, suffix = m.partition("/") if isinstance(m, str) else ("", "", "")
        ok = name in METHODS and (not sep or (suffix == "per_layer" and name in GRAM_METHODS))
        if not ok:
            _bad(f"sweep.methods[{i}]", expected, m)
    return tuple(raw)


@dataclass(frozen=True)
class PBTSpec:
    """The ``[pbt]`` table: population-based training of the task weights.

    Attributes:
        population: Members ``N`` (>= 2).
        interval_epochs: ``E``: members are ranked, exploited and explored every ``E`` epochs.
        epochs: Total epochs per member; ``None``: ``[train].epochs``.
        quantile: Fraction of the population replaced each round: the bottom
            ``Q = max(1, floor(N * quantile))`` copy members drawn from the top ``Q``
            (in ``(0, 0.5]``); ``replace`` sets ``Q`` directly instead.
        replace: ``Q`` itself (``1 <= Q <= N / 2``), overriding ``quantile``.
        metric: The validation metric to rank by: ``"score"`` (:func:`gradlens.train.score`:
            mean accuracy, or mean R^2 for regression), any metric name such as ``"accuracy"``
            or ``"loss"`` (its mean over tasks), or ``"<task>.<metric>"`` (one task's).
        mode: ``"max"`` or ``"min"``; ``None``: ``"min"`` for a metric named ``loss`` or
            ``mse``, ``"max"`` otherwise.
        perturb_factors: Factors of the multiplicative perturbation (each weight is multiplied by
            one drawn uniformly, then the vector is renormalised).
        resample_probability: Probability of redrawing the weights from Dirichlet(``alpha``)
            instead of perturbing them.
        alpha: Dirichlet concentration of the initial (``init = "random"``) and resampled
            weights.
        init: ``"random"`` (Dirichlet draws) or ``"uniform"`` (every member starts at ``1/T``).
        seed: Seeds PBT's own choices (initial weights, donors, perturbations); member ``k``
            trains with ``[train].seed + k``.
    """

    population: int = 8
    interval_epochs: int = 1
    epochs: int | None = None
    quantile: float = 0.25
    replace: int | None = None
    metric: str = "score"
    mode: str | None = None
    perturb_factors: tuple[float, ...] = (0.8, 1.25)
    resample_probability: float = 0.05
    alpha: float = 1.0
    init: str = "random"
    seed: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PBTSpec:
        """Validate a ``[pbt]`` table.

        Example:
            >>> spec = PBTSpec.from_dict({"population": 4, "metric": "loss"})
            >>> spec.n_replace, spec.resolved_mode
            (1, 'min')
        """
        d = _table("pbt", d)
        known = (
            "population", "interval_epochs", "epochs", "quantile", "replace", "metric", "mode",
            "perturb_factors", "resample_probability", "alpha", "init", "seed",
        )  # fmt: skip
        _check_keys("pbt", d, known)
        population = check_int("pbt.population", d.get("population", 8), minimum=2)
        if population > MAX_POPULATION:
            _bad(
                "pbt.population",
                f"at most {MAX_POPULATION:,} (every member trains every round and is kept in "
                "pbt.json; populations in the PBT literature are tens of members)",
                population,
            )
        interval = check_int("pbt.interval_epochs", d.get("interval_epochs", 1), minimum=1)
        epochs = d.get("epochs")
        if epochs is not None:
            epochs = check_int("pbt.epochs", epochs, minimum=1)
        quantile = _float("pbt.quantile", d.get("quantile", 0.25), 0.0, 0.5, open_low=True)
        replace = d.get("replace")
        if replace is not None:
            replace = check_int("pbt.replace", replace, minimum=1)
            if replace > population // 2:
                _bad("pbt.replace", f"at most population // 2 = {population // 2}", replace)
        metric = d.get("metric", "score")
        if not isinstance(metric, str) or metric.count(".") > 1 or not all(metric.split(".")):
            _bad("pbt.metric", 'a metric name ("score", "accuracy") or "<task>.<metric>"',
                       metric)  # fmt: skip
        mode = d.get("mode")
        if mode is not None and mode not in PBT_MODES:
            _bad("pbt.mode", f"one of {PBT_MODES}", mode)
        raw = d.get("perturb_factors", [0.8, 1.25])
        if not isinstance(raw, list) or not raw:
            _bad("pbt.perturb_factors", "a non-empty list of positive numbers", raw)
        factors = tuple(
            _float(f"pbt.perturb_factors[{i}]", v, 0.0, math.inf, open_low=True)
            for i, v in enumerate(raw)
        )
        resample = _float("pbt.resample_probability", d.get("resample_probability", 0.05), 0, 1)
        alpha = _float("pbt.alpha", d.get("alpha", 1.0), 0.0, math.inf, open_low=True)
        init = d.get("init", "random")
        if init not in PBT_INITS:
            _bad("pbt.init", f"one of {PBT_INITS}", init)
        seed = check_int("pbt.seed", d.get("seed", 0), minimum=0)
        return cls(
            population, interval, epochs, quantile, replace, metric, mode, factors, resample,
            alpha, init, seed,
        )  # fmt: skip

    @property
    def n_replace(self) -> int:
        """``Q``: members replaced (and donors drawn from) each round."""
        if self.replace is not None:
            return self.replace
        return max(1, math.floor(self.population * self.quantile))

    @property
    def resolved_mode(self) -> str:
        """``mode``, or the default for :attr:`metric` (``"min"`` for a loss or mse)."""
        if self.mode is not None:
            return self.mode
        return "min" if self.metric.split(".")[-1] in ("loss", "mse") else "max"


@dataclass(frozen=True)
class SearchConfig:
    """A parsed configuration file.

    Attributes:
        train: The ``[train]`` table, as given (the base of every run).
        sweep: The ``[sweep]`` table, if any.
        pbt: The ``[pbt]`` table, if any.
        executor: The ``[executor]`` table (defaults when absent).
        source: The file it was read from, if any.
    """

    train: dict[str, Any]
    sweep: SweepSpec | None = None
    pbt: PBTSpec | None = None
    executor: ExecutorSpec = ExecutorSpec()
    source: Path | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: Path | None = None) -> SearchConfig:
        """Validate a whole configuration (the parsed TOML document).

        Example:
            >>> cfg = SearchConfig.from_dict({"train": {"epochs": 2}, "sweep": {"p": [0.5]}})
            >>> cfg.sweep.p, cfg.executor.kind
            ((0.5,), 'local')
        """
        if not isinstance(d, Mapping):
            _bad("config", "a mapping of TOML tables", d)
        unknown = sorted(set(d) - set(_TABLES))
        if unknown:
            raise GradlensError(
                f"`{unknown[0]}` is not a known table; expected the tables {_TABLES}, found "
                f"{unknown}."
            )
        train = _table("train", d.get("train"))
        return cls(
            train=train,
            sweep=SweepSpec.from_dict(d["sweep"]) if "sweep" in d else None,
            pbt=PBTSpec.from_dict(d["pbt"]) if "pbt" in d else None,
            executor=ExecutorSpec.from_dict(d.get("executor", {})),
            source=source,
        )

    def with_executor(self, **changes: Any) -> SearchConfig:
        """A copy with some ``[executor]`` keys replaced (the CLI's ``--workers`` etc.).

        Example:
            >>> SearchConfig({}).with_executor(workers=3).executor.workers
            3
        """
        base = {
            "kind": self.executor.kind,
            "workers": self.executor.workers,
            "address": self.executor.address,
            "storage": self.executor.storage,
        }
        base.update({k: v for k, v in changes.items() if v is not None})
        spec = ExecutorSpec.from_dict({k: v for k, v in base.items() if v is not None})
        return SearchConfig(self.train, self.sweep, self.pbt, spec, self.source)


def load_config(path: str | os.PathLike[str]) -> SearchConfig:
    """Read and validate a TOML configuration file.

    Raises:
        GradlensError: If the file is missing, is not valid TOML, or a table is invalid.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "s.toml"
        >>> _ = f.write_text('[train]\\nepochs = 1\\n[sweep]\\ngrid = 3\\n')
        >>> load_config(f).sweep.grid
        3
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        from gradlens._errors import require

        tomllib = require("tomli", "dev", "Reading TOML configs on Python 3.10")
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise GradlensError(f"`config` should be a TOML file; found no file {p}.") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise GradlensError(f"`config` should be a UTF-8 TOML file; {p}: {exc}.") from None
    try:
        doc = tomllib.loads(text)
    except Exception as exc:  # tomllib.TOMLDecodeError (tomli's on 3.10)
        raise GradlensError(f"`config` should be valid TOML; {p}: {exc}.") from None
    return SearchConfig.from_dict(doc, source=p)
