"""GradlensCallback in a tiny Lightning Trainer run (CPU, no logger, no checkpoints)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradlens as gl
from gradlens.testing import reference_grams

L = pytest.importorskip("lightning")
from gradlens.integrations.lightning import GradlensCallback  # noqa: E402

TASKS = ["a", "b", "c"]
WEIGHTS = {"a": 0.5, "b": 0.3, "c": 0.2}
# Lightning's advice about dataloader workers and CPU-only runs: harmless here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The 'train_dataloader' does not have many workers"),
    # lightning 2.6 on torch 2.13: its own use of a deprecated torch.utils._pytree class
    pytest.mark.filterwarnings(
        "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
    ),
]


class MultiTask(L.LightningModule):
    def __init__(self, returns_dict: bool = True) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1) for t in TASKS})
        self.returns_dict = returns_dict

    def task_losses(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        z = self.trunk(x)
        return {
            t: ((self.heads[t](z).squeeze(1) - y[:, i]) ** 2).mean() for i, t in enumerate(TASKS)
        }

    def training_step(self, batch, batch_idx):
        losses = self.task_losses(batch)
        total = sum(WEIGHTS[t] * v for t, v in losses.items())
        if not self.returns_dict:
            return total
        return {"loss": total, "task_losses": losses, "task_weights": WEIGHTS}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 4, generator=g), torch.randn(40, len(TASKS), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _fit(module: L.LightningModule, callbacks: list, steps: int = 5) -> None:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, _loader())


def test_callback_stores_snapshots_that_match_the_reference(tmp_path):
    torch.manual_seed(0)
    module = MultiTask()
    start = copy.deepcopy(module)
    plain = copy.deepcopy(module)
    cb = GradlensCallback(TASKS, shared_attr="trunk", every=2, store=tmp_path / "run")
    _fit(module, [cb])
    _fit(plain, [])

    run = gl.load_run(tmp_path / "run")
    assert list(run.probed_steps) == [0, 2, 4]
    assert run.meta["grams"] == "local"
    assert run.meta["engine"] == "auto"  # the default, as for gl.Profiler
    assert {s.engine for s in cb.snapshots} <= {"loop", "batched", "gramian"}
    assert [s.step for s in cb.snapshots] == [0, 2, 4]
    # step 0: the initial weights on the first batch
    batch = next(iter(_loader()))
    ref = reference_grams(start.task_losses(batch), start.trunk)
    torch.testing.assert_close(cb.snapshots[0].gram, ref.gram, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.from_numpy(run.grams()[0]), cb.snapshots[0].gram)
    assert cb.snapshots[0].weights.tolist() == pytest.approx([WEIGHTS[t] for t in TASKS])
    # observe-only: Lightning's own training is untouched (same trajectory as without gradlens)
    for p, q in zip(module.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # the wrapper is gone and the profiler closed after fit
    assert "training_step" not in vars(module)
    assert cb.profiler is None


def test_training_step_must_return_task_losses():
    torch.manual_seed(0)
    cb = GradlensCallback(TASKS)
    with pytest.raises(
        gl.GradlensError, match="should return a dict with 'loss' and 'task_losses'"
    ):
        _fit(MultiTask(returns_dict=False), [cb], steps=1)


def test_bad_arguments():
    with pytest.raises(gl.GradlensError, match="`shared_attr` should be an attribute path"):
        GradlensCallback(TASKS, shared_attr="")
    with pytest.raises(gl.GradlensError, match="`keep` should be an int >= 0"):
        GradlensCallback(TASKS, keep=-1)
    cb = GradlensCallback(TASKS, shared_attr="backbone")
    with pytest.raises(gl.GradlensError, match="found no attribute 'backbone'"):
        _fit(MultiTask(), [cb], steps=1)


# Lightning's note on resuming into the directory of the checkpoints: what a resume does
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_fit_resumed_from_a_checkpoint_continues_the_run(tmp_path, monkeypatch):
    """Lightning saves the callback's state (the profiler's step, auto's decisions) in its
    checkpoints; a fit resumed from one continues the run directory from the checkpoint's step
    (the interrupted fit's later probes dropped), with the interrupted fit's engine (a fresh
    timing would now pick another). (Lightning's own resumed trajectory is not bit-identical to
    an uninterrupted fit's after its first step, with or without gradlens: the resumed probes
    are compared with what the resumed fit measured.)"""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests._auto import force_auto

    def fit(store, ckpt_dir=None, ckpt_path=None):
        torch.manual_seed(0)
        module = MultiTask()
        cb = GradlensCallback(TASKS, shared_attr="trunk", store=store)
        saver = [] if ckpt_dir is None else [
            ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1)
        ]
        trainer = L.Trainer(
            max_steps=8,  # two epochs of 4 batches: checkpoints at the end of each
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=ckpt_dir is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cb, *saver],
        )
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(32, 4, generator=g), torch.randn(32, len(TASKS), generator=g)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=ckpt_path)
        return cb

    force_auto(monkeypatch, "loop")
    fit(tmp_path / "straight")
    fit(tmp_path / "run", ckpt_dir=tmp_path / "ckpt")
    (ckpt,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    (state,) = [v["profiler"] for k, v in saved.items() if k.startswith("GradlensCallback")]
    assert state["step"] == 4
    assert [d["winner"] for d in state["auto"]["decisions"]] == ["loop"]  # timed in epoch 0
    calls = force_auto(monkeypatch, "batched")  # what a fresh timing would choose now
    cb = fit(tmp_path / "run", ckpt_dir=tmp_path / "ckpt", ckpt_path=ckpt)
    assert calls["batched"] == calls["gramian"] == 0
    assert calls["loop"] == 4  # steps 4 to 7
    assert [s.step for s in cb.snapshots] == [4, 5, 6, 7]
    run, straight = gl.load_run(tmp_path / "run", strict=True), gl.load_run(tmp_path / "straight")
    assert run.probed_steps.tolist() == straight.probed_steps.tolist() == list(range(8))
    assert run.probes["engine"].tolist() == straight.probes["engine"].tolist()
    assert run.probes["engine"].tolist()[4:] == ["loop"] * 4
    assert len(run.meta["resumes"]) == 1
    got, want = torch.from_numpy(run.all_grams()), torch.from_numpy(straight.all_grams())
    torch.testing.assert_close(got[:5], want[:5], rtol=0.0, atol=0.0)  # the checkpoint's step too
    mine = torch.stack([s.gram for s in cb.snapshots])
    torch.testing.assert_close(got[4:, 0], mine, rtol=0.0, atol=0.0)


class _Crashing(MultiTask):
    """Raises at one global step (a crash mid-fit)."""

    crash_at: int | None = None

    def training_step(self, batch, batch_idx):
        if self.global_step == self.crash_at:
            raise RuntimeError("crash")
        return super().training_step(batch, batch_idx)


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_a_fit_that_raised_is_torn_down_and_resumes_in_the_same_process(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = GradlensCallback(TASKS, shared_attr="trunk", store=tmp_path / "run", engine="loop")

    def fit(crash_at, ckpt_path=None):
        torch.manual_seed(0)
        module = _Crashing()
        module.crash_at = crash_at
        trainer = L.Trainer(
            max_steps=8,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cb, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1)],
        )
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(32, 4, generator=g), torch.randn(32, len(TASKS), generator=g)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8), ckpt_path=ckpt_path)
        return module

    with pytest.raises(RuntimeError, match="crash"):
        module = fit(crash_at=6)
    assert cb.profiler is None  # torn down: hooks, wrapper and store closed
    (ckpt,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    module = fit(crash_at=None, ckpt_path=ckpt)
    assert [s.step for s in cb.snapshots][-4:] == [4, 5, 6, 7]
    assert "training_step" not in vars(module)
    run = gl.load_run(tmp_path / "run", strict=True)
    assert run.probed_steps.tolist() == list(range(8))
