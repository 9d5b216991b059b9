"""The MLflow sink (``mlflow`` extra: ``mlflow-skinny``, the client, is enough)."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from typing import Any

from gradlens._errors import GradlensError, require
from gradlens.sinks._queue import QueuedSink

__all__ = ["MLflowSink"]

IMAGE_KEY = "gradlens.heatmap_cosine"
_BAD = re.compile(r"[^/\w.\- ]")
#: MLflow limits: metrics per log_batch call, params per call, characters of a param value.
_METRICS_PER_BATCH, _PARAMS_PER_BATCH, _PARAM_CHARS = 1000, 100, 6000


def mlflow_key(name: str) -> str:
    """A gradlens scalar name as an MLflow metric or param key.

    MLflow keys hold only letters, digits, ``_ - . /`` and spaces (colons are refused on
    Windows): anything else becomes ``_``, so the pair ``"a|b"`` is logged as ``"a_b"``.

    Example:
        >>> mlflow_key("gradlens.cosine/left|right")
        'gradlens.cosine/left_right'
    """
    return _BAD.sub("_", name)


def _flat_params(meta: Mapping[str, Any], prefix: str = "gradlens.") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in meta.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flat_params(value, name + "."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[mlflow_key(name)] = text[:_PARAM_CHARS]
    return out


class MLflowSink(QueuedSink):
    """Log gradient interference to an MLflow run, off the training thread.

    Per snapshot, the scalars of :func:`gradlens.sinks.snapshot_scalars` as metrics at
    ``step=`` the profiler's step (names through :func:`mlflow_key`: ``gradlens.cosine/a|b`` is
    ``gradlens.cosine/a_b``); every ``image_every`` snapshots, the cosine heatmap with
    ``log_image(key="gradlens.heatmap_cosine", step=...)`` (MLflow's image slider). The
    profiler's meta becomes params ``gradlens.<field>`` (nested fields joined by dots, lists as
    JSON); a field logged again with another value goes to a tag of the same name, since MLflow
    params cannot change. Everything goes through one ``MlflowClient``, never the fluent API's
    global active run, so the sink works from its thread beside your own ``mlflow.log_*``.

    Args:
        run: an existing run (an ``mlflow.entities.Run``, ``mlflow.ActiveRun`` or its run id),
            left open by :meth:`close`; None creates one in ``experiment`` and terminates it on
            :meth:`close`.
        tracking_uri: the tracking server or store (default: MLflow's own default, e.g.
            ``MLFLOW_TRACKING_URI``).
        experiment: experiment name for a new run (created if missing); default, as MLflow's
            own: ``MLFLOW_EXPERIMENT_ID``, else ``MLFLOW_EXPERIMENT_NAME``, else "Default".
        run_name: name of a new run.
        image_every, pair_limit, layer_limit, max_pending, max_pending_images: see
            :class:`gradlens.sinks.QueuedSink`.

    Example:
        >>> import os, tempfile, pytest, torch
        >>> from gradlens import Snapshot
        >>> _ = pytest.importorskip("mlflow")
        >>> os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3's local file store
        >>> uri = "file://" + tempfile.mkdtemp()
        >>> sink = MLflowSink(tracking_uri=uri, experiment="demo", image_every=0)
        >>> g = torch.tensor([[4.0, -2.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> sink.add_snapshot(Snapshot(7, ("a", "b"), g, {}, torch.ones(2)))
        >>> sink.close()
        >>> [(m.step, m.value) for m in sink.client.get_metric_history(sink.run_id,
        ...                                                           "gradlens.cosine/a_b")]
        [(7, -1.0)]
        >>> del os.environ["MLFLOW_ALLOW_FILE_STORE"]
    """

    def __init__(
        self,
        run: Any = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        image_every: int = 10,
        pair_limit: int = 10,
        layer_limit: int = 64,
        max_pending: int = 1000,
        max_pending_images: int = 2,
    ) -> None:
        super().__init__(
            image_every=image_every,
            pair_limit=pair_limit,
            layer_limit=layer_limit,
            max_pending=max_pending,
            max_pending_images=max_pending_images,
        )
        require("mlflow", "mlflow", "MLflowSink")
        from mlflow.tracking import MlflowClient

        self.client: Any = MlflowClient(tracking_uri=tracking_uri)
        if run is None:
            exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID") if experiment is None else None
            if not exp_id:
                name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
                found = self.client.get_experiment_by_name(name)
                exp_id = (
                    found.experiment_id
                    if found is not None
                    else self.client.create_experiment(name)
                )
            created = self.client.create_run(exp_id, run_name=run_name)
            self.run_id: str = created.info.run_id
            self._owns = True
        else:
            if experiment is not None or run_name is not None:
                raise GradlensError(
                    "`experiment` and `run_name` are used only when MLflowSink creates the run; "
                    "found them passed with an existing `run`. Drop one of the two."
                )
            info = getattr(run, "info", None)
            run_id = run if isinstance(run, str) else getattr(info, "run_id", None)
            if not isinstance(run_id, str) or not run_id:
                raise GradlensError(
                    "`run` should be an MLflow run (mlflow.start_run()'s result, a "
                    f"client.create_run() result or a run id) or None; found {type(run).__name__}."
                )
            self.client.get_run(run_id)  # fails now, on the caller's thread, if it is unknown
            self.run_id = run_id
            self._owns = False
        self._params: dict[str, str] = {}

    def _write(self, step: int, scalars: Mapping[str, float], rgb: Any | None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), float(v), ts, step) for k, v in scalars.items()]
        for lo in range(0, len(metrics), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[lo : lo + _METRICS_PER_BATCH])
        if rgb is not None:
            self.client.log_image(self.run_id, rgb, key=IMAGE_KEY, step=step)

    def _write_meta(self, meta: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        flat = _flat_params(meta)
        new = {k: v for k, v in flat.items() if k not in self._params}
        changed = {k: v for k, v in flat.items() if k in self._params and self._params[k] != v}
        params = [Param(k, v) for k, v in new.items()]
        for lo in range(0, len(params), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[lo : lo + _PARAMS_PER_BATCH])
        tags = [RunTag(k, v) for k, v in changed.items()]
        for lo in range(0, len(tags), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=tags[lo : lo + _PARAMS_PER_BATCH])
        self._params.update(new)

    def _finish(self) -> None:
        if self._owns:
            self.client.set_terminated(self.run_id)

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"
