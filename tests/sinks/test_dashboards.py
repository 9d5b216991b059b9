"""W&B and MLflow sinks, read back from what the real libraries wrote (W&B offline run file,
MLflow local file store through MlflowClient); the background queue's drop policy."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import gradlens as gl
from gradlens import GradlensError, GradlensWarning, Snapshot
from gradlens.sinks import MLflowSink, QueuedSink, WandbSink, mlflow_key

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("a", "b", "c")


def _expected(g: np.ndarray) -> dict[str, float]:
    """Closed forms, written out independently of gradlens.metrics (no zero gradients here)."""
    n = np.sqrt(np.diag(g))
    cos = g / np.outer(n, n)
    iu, ju = np.triu_indices(len(g), k=1)
    gms = 2 * n[iu] * n[ju] / (n[iu] ** 2 + n[ju] ** 2)
    out = {
        "cosine": cos[iu, ju].mean(),
        "conflict": (cos[iu, ju] < 0).mean(),
        "gms": gms.mean(),
        "norm_ratio": n.max() / n.min(),
    }
    out.update({f"{TASKS[i]}|{TASKS[j]}": cos[i, j] for i, j in zip(iu, ju)})
    return out


def _train(sink: Any, steps: int = 5) -> list[Snapshot]:
    """A 3-task model profiled every step; returns the snapshots."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    heads = torch.nn.ModuleList([torch.nn.Linear(4, 1) for _ in TASKS])
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.1)
    snaps = []
    with gl.Profiler(trunk, TASKS, engine="gramian", sinks=[sink], meta={"seed": 3}) as prof:
        for _ in range(steps):
            opt.zero_grad()
            z = trunk(torch.randn(16, 3))
            losses = {
                t: (h(z).squeeze(1) - k).pow(2).mean() for k, (t, h) in enumerate(zip(TASKS, heads))
            }
            snaps.append(prof.backward(losses))
            opt.step()
    return snaps


def _check_scalars(get: Any, snaps: list[Snapshot], pair: Any) -> None:
    """``get(name) -> [(step, value)]`` holds every snapshot's total, pair and layer scalars."""
    for k, snap in enumerate(snaps):
        exp = _expected(snap.gram.numpy())
        for metric, name in [
            ("cosine", "gradlens/cosine_mean"),
            ("conflict", "gradlens/conflict_frequency"),
            ("gms", "gradlens/gms_mean"),
            ("norm_ratio", "gradlens/norm_ratio"),
        ]:
            assert get(name)[k] == (snap.step, pytest.approx(exp[metric], rel=1e-9, abs=1e-12))
        for p in ("a|b", "a|c", "b|c"):
            assert get(pair(p))[k] == (snap.step, pytest.approx(exp[p], rel=1e-9, abs=1e-12))
        for layer, lg in snap.layer_grams.items():
            lexp = _expected(lg.numpy())
            assert get(f"gradlens.layer_cosine/{layer}")[k] == (
                snap.step,
                pytest.approx(lexp["cosine"], rel=1e-9, abs=1e-12),
            )
            assert get(f"gradlens.layer_norm_ratio/{layer}")[k][1] == pytest.approx(
                lexp["norm_ratio"], rel=1e-9
            )


# --------------------------------------------------------------------------- W&B


@pytest.fixture
def wandb_mod():
    return pytest.importorskip("wandb")


def _wandb_init(wandb: Any, root: Path) -> dict[str, Any]:
    return {
        "mode": "offline",
        "dir": str(root),
        "project": "gradlens-test",
        "settings": wandb.Settings(silent=True, console="off", x_disable_stats=True),
    }


def test_wandb_sink_offline_run_reads_back(tmp_path, wandb_mod):
    from tests import _wandb_log as wl

    sink = WandbSink(init=_wandb_init(wandb_mod, tmp_path), image_every=2, max_pending_images=10)
    snaps = _train(sink)
    assert sink.dropped_scalars == sink.dropped_images == 0
    path = wl.run_file(tmp_path)
    rows = wl.history(path)
    scalar_rows = [r for r in rows if "gradlens/cosine_mean" in r]
    image_rows = [r for r in rows if "gradlens.heatmap/cosine/path" in r]
    assert [r["gradlens/step"] for r in scalar_rows] == [0, 1, 2, 3, 4]
    assert [r["gradlens/step"] for r in image_rows] == [0, 2, 4]
    assert len(rows) == 5  # one log call per snapshot, its heatmap in the same row

    def get(name: str) -> list[tuple[int, float]]:
        return [(r["gradlens/step"], r[name]) for r in scalar_rows]

    _check_scalars(get, snaps, lambda p: f"gradlens.cosine/{p}")
    assert {"gradlens.layer_conflict/0", "gradlens.layer_gms/2"} <= set(scalar_rows[0])
    # the x axis of every gradlens chart is the profiler's step
    assert ("", "gradlens*", "gradlens/step") in wl.metric_definitions(path)
    cfg = wl.config(path)["gradlens"]
    assert cfg["tasks"] == list(TASKS)
    assert cfg["seed"] == 3
    assert cfg["engine"] == "gramian"
    # the heatmap PNGs wandb wrote are the rendered figure (coloured cells, not blank)
    media = path.parent / "files" / image_rows[-1]["gradlens.heatmap/cosine/path"]
    img = mpimg.imread(media)[..., :3]
    assert img.shape[0] > 100
    assert img.shape[1] > 200
    assert (np.ptp(img, axis=2) > 0.2).mean() > 0.02


def test_wandb_sink_on_an_existing_run_leaves_it_open(tmp_path, wandb_mod):
    from tests import _wandb_log as wl

    run = wandb_mod.init(**_wandb_init(wandb_mod, tmp_path))
    run.log({"loss": 1.0})
    sink = WandbSink(run, image_every=0)
    snaps = _train(sink, steps=2)  # the profiler closes the sink, not the run
    run.log({"loss": 0.5})  # the run is still open
    run.finish()
    rows = wl.history(wl.run_file(tmp_path))
    assert [r.get("loss") for r in rows] == [1.0, None, None, 0.5]
    assert [r.get("gradlens/step") for r in rows] == [None, 0, 1, None]
    assert rows[1]["gradlens.cosine/a|b"] == pytest.approx(snaps[0].cosine()[0, 1].item())
    with pytest.raises(GradlensError, match="`init` is used only when WandbSink starts"):
        WandbSink(run, init={"mode": "offline"})
    with pytest.raises(GradlensError, match=r"`run` should be a wandb run .*; found int"):
        WandbSink(3)


# --------------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's local file store
    return (tmp_path / "mlruns").as_uri()


def test_mlflow_sink_file_store_reads_back(mlflow_uri):
    sink = MLflowSink(
        tracking_uri=mlflow_uri, experiment="e", run_name="r", image_every=2, max_pending_images=10
    )
    snaps = _train(sink)
    client = sink.client
    run = client.get_run(sink.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "r"
    assert client.get_experiment(run.info.experiment_id).name == "e"

    def get(name: str) -> list[tuple[int, float]]:
        hist = client.get_metric_history(sink.run_id, mlflow_key(name))
        return sorted((m.step, m.value) for m in hist)

    _check_scalars(get, snaps, lambda p: f"gradlens.cosine/{p}")
    assert "gradlens.cosine/a_b" in run.data.metrics
    params = run.data.params
    assert params["gradlens.tasks"] == '["a", "b", "c"]'
    assert params["gradlens.seed"] == "3"
    assert params["gradlens.engine"] == "gramian"
    images = [f.path for f in client.list_artifacts(sink.run_id, "images")]
    pngs = sorted(p for p in images if p.endswith(".png") and "compressed" not in p)
    assert [int(p.split("+step+")[1].split("+")[0]) for p in pngs] == [0, 2, 4]
    local = client.download_artifacts(sink.run_id, pngs[0], str(Path(mlflow_uri[7:]).parent))
    img = mpimg.imread(local)[..., :3]
    assert (np.ptp(img, axis=2) > 0.2).mean() > 0.02


def test_mlflow_sink_default_experiment(tmp_path, mlflow_uri, monkeypatch):
    (tmp_path / "mlruns").mkdir()  # an existing empty store has no experiment "0" yet
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    sink = MLflowSink(tracking_uri=mlflow_uri, image_every=0)
    sink.close()
    exp = sink.client.get_experiment(sink.client.get_run(sink.run_id).info.experiment_id)
    assert exp.name == "Default"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    sink = MLflowSink(tracking_uri=mlflow_uri, image_every=0)
    sink.close()
    exp = sink.client.get_experiment(sink.client.get_run(sink.run_id).info.experiment_id)
    assert exp.name == "from-env"


def test_mlflow_sink_on_an_existing_run(mlflow_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.create_run("0")
    sink = MLflowSink(run, tracking_uri=mlflow_uri, image_every=0)
    sink.update_meta(tasks=["x"], config={"lr": 0.1, "note": "a|b"})
    sink.update_meta(tasks=["y"])  # params cannot change: the new value goes to a tag
    sink.close()
    back = client.get_run(run.info.run_id)
    assert back.info.status == "RUNNING"  # not ours to end
    assert back.data.params["gradlens.tasks"] == '["x"]'
    assert back.data.params["gradlens.config.lr"] == "0.1"
    assert back.data.params["gradlens.config.note"] == "a|b"
    assert back.data.tags["gradlens.tasks"] == '["y"]'
    with pytest.raises(GradlensError, match="`experiment` and `run_name` are used only"):
        MLflowSink(run, tracking_uri=mlflow_uri, experiment="e")
    with pytest.raises(GradlensError, match=r"`run` should be an MLflow run .*; found float"):
        MLflowSink(1.5, tracking_uri=mlflow_uri)


# --------------------------------------------------------------------------- the queue


class _Recorder(QueuedSink):
    """A backend that records, and whose image writes wait for ``release``."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.release = threading.Event()
        self.started = threading.Event()
        self.scalars: list[int] = []
        self.images: list[int] = []
        self.finished = 0
        self.fail_at: int | None = None

    def _write(self, step: int, scalars: Any, rgb: Any) -> None:
        if step == self.fail_at:
            raise OSError("disk full")
        self.scalars.append(step)
        if rgb is not None:
            self.started.set()
            self.release.wait(30)
            self.images.append(step)

    def _write_meta(self, meta: Any) -> None:
        pass

    def _finish(self) -> None:
        self.finished += 1


def _snap(step: int) -> Snapshot:
    g = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    return Snapshot(step, ("a", "b"), g, {}, torch.ones(2))


def test_a_slow_backend_drops_images_first_and_says_so_once():
    sink = _Recorder(image_every=1, max_pending=6, max_pending_images=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.add_snapshot(_snap(0))
        assert sink.started.wait(30)  # the worker is stuck writing step 0's image
        for step in range(1, 12):
            sink.add_snapshot(_snap(step))
    messages = [str(w.message) for w in caught if issubclass(w.category, GradlensWarning)]
    assert len(messages) == 2
    assert "heatmap images are skipped while 2 wait" in messages[0]  # at step 2
    assert "6 snapshots wait, the oldest are dropped" in messages[1]  # at step 7
    sink.release.set()
    sink.close()
    sink.close()
    assert sink.finished == 1
    # waiting: 1 (image), 2..6 (images skipped); 7 pushed 1 out, and its image took 1's place
    assert sink.scalars == [0, 6, 7, 8, 9, 10, 11]
    assert sink.images == [0, 7]
    assert sink.dropped_scalars == 5
    assert sink.dropped_images == 10  # 2..6 and 8..11 skipped, 1's went with its snapshot


def test_a_backend_error_surfaces_on_the_training_thread():
    sink = _Recorder(image_every=0)
    sink.fail_at = 1
    sink.add_snapshot(_snap(0))
    sink.add_snapshot(_snap(1))
    with pytest.raises(GradlensError, match=r"_Recorder stopped logging: .*OSError: disk full"):
        sink.flush(timeout=30)
    with pytest.raises(GradlensError, match="closed"):
        sink.add_snapshot(_snap(2))
    sink.close()
    assert sink.scalars == [0]
    assert sink.finished == 1


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"image_every": -1}, "`image_every` should be an int >= 0; found -1"),
        ({"max_pending": 0}, "`max_pending` should be an int >= 1; found 0"),
        ({"pair_limit": True}, "`pair_limit` should be an int >= 0; found True"),
    ],
)
def test_bad_arguments(kw, msg):
    with pytest.raises(GradlensError, match=msg):
        _Recorder(**kw)
