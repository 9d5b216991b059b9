"""GradlensTrainerCallback in a tiny Hugging Face Trainer run: a 1-layer BERT built from a config
(no download), two task heads, CPU, no logging, no checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradlens as gl

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import BertConfig, BertModel, Trainer, TrainingArguments

from gradlens.integrations.transformers import GradlensTrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["topic", "score"]
WEIGHTS = {"topic": 0.7, "score": 0.3}


class TwoTaskBert(nn.Module):
    """A BERT trunk, a classification head and a regression head on the [CLS] vector."""

    def __init__(self, returns: str = "dict") -> None:
        super().__init__()
        cfg = BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.topic = nn.Linear(16, 3)
        self.score = nn.Linear(16, 1)
        self.returns = returns

    def forward(self, input_ids, attention_mask, topic, score):
        z = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        losses = {
            "topic": F.cross_entropy(self.topic(z), topic),
            "score": F.mse_loss(self.score(z).squeeze(1), score),
        }
        total = sum(WEIGHTS[t] * v for t, v in losses.items())
        if self.returns == "tuple":
            return (total,)
        return {"loss": total, "task_losses": losses, "task_weights": WEIGHTS}


def _data(n: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 40, (n, 10), generator=g)
    return [
        {
            "input_ids": ids[i],
            "attention_mask": torch.ones(10, dtype=torch.long),
            "topic": int(ids[i, 0] % 3),
            "score": float(ids[i, 1]) / 40.0,
        }
        for i in range(n)
    ]


def _args(tmp_path, **kw):
    """Training arguments of these tests: CPU, quiet, seeded; ``kw`` adds or overrides."""
    base = {
        "max_steps": 4,
        "per_device_train_batch_size": 6,
        "learning_rate": 1e-2,
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
    }
    return TrainingArguments(output_dir=str(tmp_path / "hf"), **{**base, **kw})


def _fit(tmp_path, callbacks=(), returns="dict", **kw):
    torch.manual_seed(0)
    model = TwoTaskBert(returns)
    trainer = Trainer(
        model=model, args=_args(tmp_path, **kw), train_dataset=_data(), callbacks=list(callbacks)
    )
    trainer.train()
    return model


def test_callback_profiles_a_trainer_run_without_changing_it(tmp_path):
    plain = _fit(tmp_path / "plain")
    run_dir = tmp_path / "run"
    cb = GradlensTrainerCallback(TASKS, shared_attr="bert", every=1, store=run_dir)
    observed = _fit(tmp_path / "observed", [cb])
    # observe-only: the same parameters, bit for bit, as without the callback
    for (name, p), q in zip(plain.named_parameters(), observed.parameters()):
        assert torch.equal(p, q), name
    # the same run profiled by the loop reference engine measures the same Grams
    cb_loop = GradlensTrainerCallback(TASKS, shared_attr="bert", engine="loop", every=1)
    _fit(tmp_path / "loop", [cb_loop])
    assert [s.step for s in cb.snapshots] == [s.step for s in cb_loop.snapshots] == [0, 1, 2, 3]
    for a, b in zip(cb.snapshots, cb_loop.snapshots):
        torch.testing.assert_close(a.gram, b.gram, rtol=1e-4, atol=1e-9)
        assert a.weights.tolist() == pytest.approx([0.7, 0.3])
    # the store, and the wrapper gone after train()
    run = gl.load_run(run_dir)
    assert run.tasks == tuple(TASKS)
    assert list(run.probed_steps) == [0, 1, 2, 3]
    assert run.meta["framework"] == "transformers"
    assert run.meta["grams"] == "local"
    assert run.meta["engine"] == "auto"  # the default, as for gl.Profiler
    assert {s.engine for s in cb.snapshots} <= {"loop", "batched", "gramian"}
    assert any(layer.startswith("encoder.layer.0.attention") for layer in run.layers)
    assert "forward" not in vars(observed)
    assert cb.profiler is None


class CheckpointedTwoTaskBert(TwoTaskBert):
    """The same model, with what the Trainer's activation checkpointing calls (its name in
    transformers 5, and the older one)."""

    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kw):
        enable = getattr(self.bert, "activation_checkpointing_enable", None)
        if enable is None:
            self.bert.gradient_checkpointing_enable(activation_checkpointing_kwargs)
        else:
            enable(activation_checkpointing_kwargs)

    gradient_checkpointing_enable = activation_checkpointing_enable


def test_gradient_checkpointing_with_dropout_trains_and_auto_serves_it_with_loop(tmp_path):
    """``gradient_checkpointing=True`` (non-reentrant) in train mode with BERT's dropout: the
    recomputed segment's dropout cannot run under vmap, so ``auto`` drops ``batched`` and
    ``gramian`` for the graph and serves every probe with ``loop``; training is unchanged."""

    def fit(name, callbacks=()):
        torch.manual_seed(0)
        model = CheckpointedTwoTaskBert()
        new = "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        kind = "activation_checkpointing" if new else "gradient_checkpointing"
        args = _args(
            tmp_path / name, **{kind: True, f"{kind}_kwargs": {"use_reentrant": False}}
        )
        Trainer(model=model, args=args, train_dataset=_data(), callbacks=list(callbacks)).train()
        return model

    plain = fit("plain")
    cb = GradlensTrainerCallback(TASKS, shared_attr="bert", every=1)
    observed = fit("auto", [cb])
    for (name, p), q in zip(plain.named_parameters(), observed.parameters()):
        assert torch.equal(p, q), name
    cb_loop = GradlensTrainerCallback(TASKS, shared_attr="bert", engine="loop", every=1)
    fit("loop", [cb_loop])
    assert [s.engine for s in cb.snapshots] == ["loop"] * 4
    assert "auto-dropped:batched:random-op" in cb.snapshots[1].notes
    for a, b in zip(cb.snapshots, cb_loop.snapshots):
        torch.testing.assert_close(a.gram, b.gram, rtol=1e-4, atol=1e-9)


class _Sink:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.meta: dict = {}
        self.closed = False

    def add_snapshot(self, snap) -> None:
        self.steps.append(snap.step)

    def update_meta(self, **meta) -> None:
        self.meta.update(meta)

    def close(self) -> None:
        self.closed = True


def test_micro_batches_are_profiled_and_evaluation_is_not(tmp_path):
    sink = _Sink()
    cb = GradlensTrainerCallback(TASKS, shared_attr="bert", every=1, keep=100, sinks=[sink])
    model = _fit(tmp_path, [cb], gradient_accumulation_steps=2)
    assert [s.step for s in cb.snapshots] == list(range(8))  # 4 optimizer steps x 2
    assert sink.steps == list(range(8))
    assert sink.closed
    assert sink.meta["framework"] == "transformers"
    model.eval()
    batch = _data(2)
    with torch.no_grad():
        model(**{k: torch.stack([torch.as_tensor(b[k]) for b in batch]) for k in batch[0]})
    assert len(cb.snapshots) == 8


def test_errors(tmp_path):
    cb = GradlensTrainerCallback(TASKS, shared_attr="trunk")
    with pytest.raises(gl.GradlensError, match="`shared_attr` should name the shared module"):
        _fit(tmp_path, [cb])
    cb = GradlensTrainerCallback(TASKS, shared_attr="bert")
    with pytest.raises(gl.GradlensError, match=r"should return a dict .* found tuple"):
        _fit(tmp_path, [cb], returns="tuple")
    with pytest.raises(gl.GradlensError, match="`keep` should be an int >= 0; found -1"):
        GradlensTrainerCallback(TASKS, shared_attr="bert", keep=-1)
    with pytest.raises(gl.GradlensError, match="`shared_attr` should be an attribute path"):
        GradlensTrainerCallback(TASKS, shared_attr="")


def test_a_forward_set_on_the_instance_is_put_back(tmp_path):
    """accelerate's mixed precision sets ``model.forward`` on the instance; the callback wraps it
    and puts it back after training."""
    torch.manual_seed(0)
    model = TwoTaskBert()
    calls = []

    def instance_forward(*args, **kwargs):
        calls.append(1)
        return TwoTaskBert.forward(model, *args, **kwargs)

    model.forward = instance_forward
    cb = GradlensTrainerCallback(TASKS, shared_attr="bert", every=2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=2,
        per_device_train_batch_size=6,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,  # the instance forward's signature is (*args, **kwargs)
    )
    Trainer(model=model, args=args, train_dataset=_data(), callbacks=[cb]).train()
    assert vars(model)["forward"] is instance_forward
    assert len(calls) == 2
    assert [s.step for s in cb.snapshots] == [0]


def _resumable_fit(tmp_path, resume=None, n=24, **kw):
    """A Trainer run that saves checkpoints, profiled into ``tmp_path / "run"``."""
    torch.manual_seed(0)
    cb = GradlensTrainerCallback(TASKS, shared_attr="bert", store=tmp_path / "run")
    args = _args(tmp_path, per_device_train_batch_size=3, save_strategy="steps", **kw)
    Trainer(model=TwoTaskBert(), args=args, train_dataset=_data(n), callbacks=[cb]).train(
        resume_from_checkpoint=resume
    )
    return cb


def test_a_run_resumed_from_a_checkpoint_continues_the_store(tmp_path):
    """``train(resume_from_checkpoint=...)``: the callback reopens the run directory, drops the
    interrupted run's probes past the checkpoint, and goes on from the checkpoint's step."""

    def fit(resume=None, accumulate=1):
        return _resumable_fit(
            tmp_path, resume, max_steps=4, gradient_accumulation_steps=accumulate, save_steps=2
        )

    fit(accumulate=2)  # 4 optimizer steps of 2 micro-batches: probes 0 to 7
    first = gl.load_run(tmp_path / "run")
    assert first.probed_steps.tolist() == list(range(8))
    cb = fit(resume=str(tmp_path / "hf" / "checkpoint-2"), accumulate=2)
    assert [s.step for s in cb.snapshots] == [4, 5, 6, 7]  # after 2 steps of 2 micro-batches
    run = gl.load_run(tmp_path / "run", strict=True)
    assert run.probed_steps.tolist() == list(range(8))
    assert [r["after_step"] for r in run.meta["resumes"]] == [7]
    # the steps before the checkpoint are the first run's, the others the resumed run's
    got = torch.from_numpy(run.all_grams())
    torch.testing.assert_close(got[:4], torch.from_numpy(first.all_grams())[:4], rtol=0, atol=0)
    mine = torch.stack([s.gram for s in cb.snapshots])
    torch.testing.assert_close(got[4:, 0], mine, rtol=0, atol=0)


def test_a_resumed_run_counts_the_short_last_accumulation_group_of_an_epoch(tmp_path):
    """15 examples of batch 3, accumulation 2: an epoch is 5 forwards and 3 optimizer steps
    (the last from 1 forward). Resumed from checkpoint-3 (the end of epoch 1), the run goes on
    at forward 5, not 3 x 2 = 6."""

    def fit(resume=None):
        return _resumable_fit(
            tmp_path, resume, 15, max_steps=-1, num_train_epochs=2, gradient_accumulation_steps=2,
            save_steps=3,
        )

    fit()
    assert gl.load_run(tmp_path / "run").probed_steps.tolist() == list(range(10))
    cb = fit(resume=str(tmp_path / "hf" / "checkpoint-3"))
    assert [s.step for s in cb.snapshots] == [5, 6, 7, 8, 9]
    assert gl.load_run(tmp_path / "run", strict=True).probed_steps.tolist() == list(range(10))
