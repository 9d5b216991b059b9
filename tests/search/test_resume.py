"""Sweeps and PBT resumed after an interruption keep every step their runs flushed before it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import gradlens.search.pbt as pbt_module
from gradlens import load_run
from gradlens.search import SearchConfig, run_pbt
from tests._auto import force_auto
from tests._tiny import SYNTH

pytestmark = pytest.mark.usefixtures("one_thread")



def _pbt_cfg() -> SearchConfig:
    return SearchConfig.from_dict(
        {
            "train": SYNTH,
            "pbt": {"population": 2, "epochs": 4, "interval_epochs": 1, "seed": 1},
            "executor": {"workers": 1},
        }
    )


def test_pbt_resume_keeps_the_history_flushed_before_the_interruption(tmp_path, monkeypatch):
    """Interrupt PBT in round 3 after the members flushed half a round past their checkpoints;
    the resumed members' runs hold exactly the uninterrupted run's steps, Grams and evals."""
    cfg = _pbt_cfg()
    force_auto(monkeypatch, "loop")  # the engine both runs time as the fastest
    run_pbt(cfg, tmp_path / "straight", progress=False)
    real = pbt_module._Members.train
    calls: list[int] = []
    on_disk: list[list[int]] = []

    def interrupted(self, ks, epochs, ckpt_dir):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:  # round 3: train past the checkpoint, flush, train on, then "die"
            for k in ks:
                tr = self._trainers[k]
                # the checkpoint of round 2 was taken with every step before it on disk
                on_disk.append(load_run(tr.run_dir).probed_steps.tolist())
                tr.fit_epochs(1)
                tr.store.flush()  # on disk beyond the checkpoint: the resume must drop it
                tr.fit_epochs(1)
                tr.store._state._clear()  # what a SIGKILL loses: the unflushed buffer
            raise KeyboardInterrupt
        return real(self, ks, epochs, ckpt_dir)

    monkeypatch.setattr(pbt_module._Members, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pbt(cfg, tmp_path / "resumed", progress=False)
    assert on_disk == [list(range(8))] * 2
    flushed = load_run(tmp_path / "resumed" / "member-000").probed_steps
    assert flushed.max() == 11  # steps past the epoch-2 checkpoint (step 7) were flushed
    monkeypatch.setattr(pbt_module._Members, "train", real)
    calls = force_auto(monkeypatch, "batched")  # timing anew would now choose batched
    run_pbt(cfg, tmp_path / "resumed", progress=False)
    assert calls["batched"] == 0 < calls["loop"]  # the members' checkpoints hold auto's choice
    for m in ("member-000", "member-001"):
        a = load_run(tmp_path / "resumed" / m, strict=True)
        b = load_run(tmp_path / "straight" / m, strict=True)
        np.testing.assert_array_equal(a.probed_steps, b.probed_steps)
        np.testing.assert_array_equal(a.probed_steps, np.arange(16))
        torch.testing.assert_close(a.all_grams(), b.all_grams(), rtol=1e-12, atol=0.0)
        assert a.evals[["point", "split", "task", "metric"]].equals(
            b.evals[["point", "split", "task", "metric"]]
        )
        assert a.meta["weight_schedule"] == b.meta["weight_schedule"]
        assert [r["after_step"] for r in a.meta["resumes"]] == [11]  # what was flushed


def test_a_sweep_run_trains_with_its_recorded_thread_count(tmp_path, monkeypatch):
    """Whatever the driver's (or a worker's) torch thread count, a run trains with the count its
    config records (1 by default), so in-process, process-pool and resumed runs agree."""
    from gradlens.search import run_sweep
    from gradlens.train import Trainer

    seen: list[int] = []
    real = Trainer._train_epoch

    def spy(self):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return real(self)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    force_auto(monkeypatch, "gramian")  # both runs use one engine (see tests/_auto.py)
    cfg = SearchConfig.from_dict(
        {"train": SYNTH, "sweep": {"p": [0.3]}, "executor": {"workers": 1}}
    )
    grams = []
    for threads in (1, 2):
        torch.set_num_threads(threads)  # the module fixture restores the count afterwards
        out = tmp_path / f"t{threads}"
        run_sweep(cfg, out, progress=False)
        run = load_run(out / "w0.3-0.7_seed0")
        assert run.meta["config"]["threads"] == 1
        grams.append(run.all_grams())
        assert torch.get_num_threads() == threads  # restored after the run
    assert set(seen) == {1}
    torch.testing.assert_close(grams[0], grams[1], rtol=1e-13, atol=0.0)


@pytest.mark.parametrize("field", ["weights", "weight_schedule"])
def test_train_weights_in_a_search_config_are_refused_not_ignored(tmp_path, field):
    from gradlens import GradlensError
    from gradlens.search import run_sweep

    value = {"task0": 0.9, "nosuch": 0.1}
    if field == "weight_schedule":
        value = [{"epoch": 0, "weights": value}]
    train = {**SYNTH, field: value}
    sweep = SearchConfig.from_dict({"train": train, "sweep": {"p": [0.5]}})
    with pytest.raises(GradlensError, match=rf"`train.{field}` should not be set in a sweep"):
        run_sweep(sweep, tmp_path / "s", progress=False)
    pbt = SearchConfig.from_dict({"train": train, "pbt": {"population": 2}})
    with pytest.raises(GradlensError, match=rf"`train.{field}` should not be set in a pbt"):
        run_pbt(pbt, tmp_path / "p", progress=False)
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "p").exists()


def _sweep_cfg(epochs: int, **train: object) -> SearchConfig:
    return SearchConfig.from_dict(
        {
            "train": {**SYNTH, "epochs": epochs, **train},
            "sweep": {"p": [0.3]},
            "executor": {"workers": 1},
        }
    )


def _same_run(a_dir: Path, b_dir: Path) -> None:
    """Two runs hold the same probed steps, Grams (to float rounding) and evals."""
    a, b = load_run(a_dir, strict=True), load_run(b_dir, strict=True)
    np.testing.assert_array_equal(a.probed_steps, b.probed_steps)
    torch.testing.assert_close(a.all_grams(), b.all_grams(), rtol=1e-10, atol=1e-14)
    keys = ["point", "split", "task", "metric"]
    assert a.evals[keys].equals(b.evals[keys])
    np.testing.assert_allclose(a.evals["value"], b.evals["value"], rtol=1e-10, atol=1e-14)


def test_sweep_resume_continues_an_interrupted_run_from_its_checkpoint(tmp_path, monkeypatch):
    """A sweep run interrupted in epoch 4, after it flushed steps past its epoch-2 checkpoint:
    the rerun reopens it in append mode at the checkpoint's step, keeps every step flushed
    before it, and ends with the uninterrupted sweep's steps, Grams, evals and final results."""
    from gradlens.search import run_sweep
    from gradlens.train import Trainer

    cfg = _sweep_cfg(5, every=1)
    run_id = "w0.3-0.7_seed0"
    force_auto(monkeypatch, "loop")
    straight = run_sweep(cfg, tmp_path / "straight", progress=False)
    per_epoch = load_run(tmp_path / "straight" / run_id).meta["steps_run"] // 5
    real = Trainer.fit_epochs
    seen: dict[str, object] = {}

    def interrupted(self, n):  # type: ignore[no-untyped-def]
        if self.epoch < 2:
            return real(self, n)
        # the epoch-2 checkpoint was taken with every step before it on disk
        seen["at_checkpoint"] = load_run(self.run_dir).probed_steps.tolist()
        seen["checkpoint"] = (tmp_path / "resumed" / "checkpoints" / f"{run_id}.pt").is_file()
        real(self, 1)
        self.store.flush()  # on disk beyond the checkpoint: the resume must redo it
        real(self, 1)
        self.store._state._clear()  # what a SIGKILL loses: the unflushed buffer
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit_epochs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(Trainer, "fit_epochs", real)
    assert seen == {"at_checkpoint": list(range(2 * per_epoch)), "checkpoint": True}
    flushed = load_run(tmp_path / "resumed" / run_id).probed_steps.tolist()
    assert flushed == list(range(3 * per_epoch))
    calls = force_auto(monkeypatch, "batched")  # timing anew would now choose batched
    resumed = run_sweep(cfg, tmp_path / "resumed", progress=False)
    assert calls["batched"] == 0 < calls["loop"]  # the run's checkpoint holds auto's choice
    assert resumed["status"].tolist() == ["done"]
    np.testing.assert_allclose(resumed[["val", "test"]], straight[["val", "test"]], rtol=1e-10)
    run = load_run(tmp_path / "resumed" / run_id, strict=True)
    assert [r["after_step"] for r in run.meta["resumes"]] == [flushed[-1]]
    assert set(flushed) <= set(run.probed_steps.tolist())
    assert run.meta["epochs_run"] == 5
    _same_run(tmp_path / "resumed" / run_id, tmp_path / "straight" / run_id)
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # removed once all runs are done


def test_a_failed_sweep_run_is_redone_from_scratch_not_from_its_checkpoint(tmp_path, monkeypatch):
    from gradlens.search import run_sweep
    from gradlens.train import Trainer

    cfg = _sweep_cfg(3)
    real = Trainer.fit_epochs

    def failing(self, n):  # type: ignore[no-untyped-def]
        if self.epoch == 2:
            raise RuntimeError("boom")
        return real(self, n)

    monkeypatch.setattr(Trainer, "fit_epochs", failing)
    df = run_sweep(cfg, tmp_path / "s", progress=False)
    assert df["status"].tolist() == ["failed"]
    assert not (tmp_path / "s" / "checkpoints" / "w0.3-0.7_seed0.pt").exists()
    monkeypatch.setattr(Trainer, "fit_epochs", real)
    df = run_sweep(cfg, tmp_path / "s", progress=False)
    assert df["status"].tolist() == ["done"]
    assert "resumes" not in load_run(tmp_path / "s" / "w0.3-0.7_seed0").meta


def test_train_resumes_from_its_checkpoint_with_early_stopping_state(tmp_path, monkeypatch):
    """``train(checkpoint=...)`` killed after epoch 3 and called again gives the uninterrupted
    run's final metrics, epochs and early-stopping record."""
    import gradlens.train.run as run_module
    from gradlens.train import train

    cfg = {**SYNTH, "epochs": 6, "early_stopping": 2, "every": 3}
    force_auto(monkeypatch, "loop")
    ref = train(cfg, tmp_path / "straight", progress=False)
    real = run_module._save_checkpoint
    calls: list[int] = []

    def dying(trainer, stopper, path):  # type: ignore[no-untyped-def]
        real(trainer, stopper, path)
        calls.append(trainer.epoch)
        if trainer.epoch == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_save_checkpoint", dying)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "resumed", progress=False, checkpoint=ckpt)
    assert ckpt.is_file()
    monkeypatch.setattr(run_module, "_save_checkpoint", real)
    calls = force_auto(monkeypatch, "batched")  # timing anew would now choose batched
    res = train(cfg, tmp_path / "resumed", progress=False, checkpoint=ckpt)
    assert calls["batched"] == 0 < calls["loop"]
    assert not ckpt.exists()
    assert (res.epochs_run, res.stopped_early) == (ref.epochs_run, ref.stopped_early)
    for split in ("val", "test"):
        for task, m in ref.metrics[split].items():
            for k, v in m.items():
                assert res.metrics[split][task][k] == pytest.approx(v, rel=1e-10, abs=1e-14)
    a, b = load_run(tmp_path / "resumed"), load_run(tmp_path / "straight")
    assert a.meta["early_stopping"]["best_epoch"] == b.meta["early_stopping"]["best_epoch"]
    assert a.meta["early_stopping"]["best_score"] == pytest.approx(
        b.meta["early_stopping"]["best_score"], rel=1e-10
    )
    _same_run(tmp_path / "resumed", tmp_path / "straight")


def test_train_refuses_a_damaged_checkpoint(tmp_path):
    from gradlens import GradlensError
    from gradlens.train import train

    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(GradlensError, match=r"`checkpoint` .*run.pt should be a checkpoint"):
        train({**SYNTH, "epochs": 1}, progress=False, checkpoint=ckpt)
    with pytest.raises(GradlensError, match=r"`checkpoint_every` should be an int >= 1; found 0"):
        train({**SYNTH, "epochs": 1}, progress=False, checkpoint=ckpt, checkpoint_every=0)
