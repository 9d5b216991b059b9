"""End-to-end tests of ``gradlens train`` and ``gradlens demo`` (tiny sizes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradlens import TOTAL_LAYER, load_run
from gradlens.cli import main
from gradlens.train import TrainConfig
from tests._tiny import tiny_train_args

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


TINY = tiny_train_args()


def test_train_command_stores_the_run_and_prints_the_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *TINY, "--weights", "left=1,right=3", "--seed", "2", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    header = text.splitlines()[0].split()
    assert header[:5] == ["task", "val", "accuracy", "val", "loss"]
    assert [line.split()[0] for line in text.splitlines()[1:4]] == ["left", "right", "mean"]
    assert f"run stored in {out}" in text
    run = load_run(out)
    assert run.meta["weights"] == {"left": 0.25, "right": 0.75}
    cfg = TrainConfig.from_dict(run.meta["config"])
    assert (cfg.seed, cfg.width, cfg.depth, cfg.batch_size, cfg.every) == (2, 0.125, 1, 32, 2)
    assert cfg.dataset_options == {"n": 128}
    final = run.evals[run.evals.point == "final"]
    acc = final[(final.split == "test") & (final.task == "left") & (final.metric == "accuracy")]
    assert f"{acc['value'].item():.4f}" in text.splitlines()[1]


def test_train_command_reads_a_toml_config_and_flags_override_it(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        "[train]\n"
        'dataset = "synthetic"\n'
        "epochs = 3\n"
        'every = "log:2"\n'
        "[train.dataset_options]\n"
        "n = 100\n"
        "angle = 90.0\n"
        "[train.config]\n"
        'note = "from toml"\n',
        encoding="utf-8",
    )
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--epochs", "1", "--tasks", "task1"]
    args += ["--data-option", "noise=0.5", "--width", "0.125", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "val r2" in text.splitlines()[0]
    assert "val mse" in text.splitlines()[0]
    cfg = TrainConfig.from_dict(load_run(out).meta["config"])
    assert cfg.epochs == 1
    assert cfg.tasks == ["task1"]
    assert cfg.every == "log:2"
    assert cfg.dataset_options == {"n": 100, "angle": 90.0, "noise": 0.5}
    assert cfg.config == {"note": "from toml"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "left:0.3"], "`--weights` should look like left=0.3,right=0.7"),
        (["--data-option", "n"], "`--data-option` should look like KEY=VALUE"),
        (["--optimizer", "lbfgs"], "`optimizer` should be one of ['sgd', 'adam']"),
        (["--tasks", "left,up"], "['up']"),
        (["--threads", "0"], "`--threads` should be an int >= 1; found 0"),
        (["--config", "missing.toml"], "`--config` should be a TOML file; found no file"),
    ],
)
def test_train_command_reports_bad_input(tmp_path, capsys, args, message):
    code = main(["train", *TINY, "--out", str(tmp_path / "r"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("gradlens train: error: ")
    assert message in err


def test_train_command_rejects_bad_toml_and_unknown_fields(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = \n", encoding="utf-8")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "a")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("epoch = 3\n", encoding="utf-8")
    assert main(["train", "--config", str(unknown), "--out", str(tmp_path / "b")]) == 2
    assert "Unknown TrainConfig field(s) ['epoch']; valid fields:" in capsys.readouterr().err


def test_train_command_refuses_to_overwrite_a_run_unless_asked(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", out]) == 0
    assert main(["train", *TINY, "--out", out]) == 2
    assert "already holds a run" in (err := capsys.readouterr().err)
    assert "`gradlens train`: --overwrite" in err
    assert main(["train", *TINY, "--out", out, "--overwrite", "--seed", "1"]) == 0
    assert load_run(out).meta["seed"] == 1


def _check_demo_output(out: Path, text: str) -> None:
    for name in ("heatmap.png", "layers.png"):
        assert (out / name).read_bytes()[:8] == PNG
    run = load_run(out / "run")
    assert run.tasks == ("left", "right")
    assert run.meta["engine"] == "gramian"
    assert len(run.probed_steps) == 6  # 384 samples / 64 per batch, every step probed
    final = run.evals[run.evals.point == "final"]
    for task in ("left", "right"):
        acc = final[(final.task == task) & (final.metric == "accuracy")]
        val = acc[acc.split == "val"]["value"].item()
        test = acc[acc.split == "test"]["value"].item()
        assert f"{task:<8}{val:>10.4f}{test:>10.4f}" in text
    for label in ("mean cosine", "conflict frequency", "norm ratio", "most conflicted layer"):
        assert label in text
    m = run.metrics
    cos = m[(m.layer == TOTAL_LAYER) & (m.metric == "cosine")]["value"].mean()
    assert f"mean cosine          {cos:+.3f}" in text
    assert str(out / "heatmap.png") in text


def test_demo_quick_in_process(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    _check_demo_output(out, capsys.readouterr().out)


@pytest.mark.slow
def test_demo_quick_as_a_subprocess(tmp_path, capsys):
    out = tmp_path / "demo"
    # a demo already in the folder (2 epochs) is replaced
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--epochs", "2"]) == 0
    assert load_run(out / "run").meta["epochs_run"] == 2
    capsys.readouterr()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "gradlens.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    _check_demo_output(out, proc.stdout)
    assert load_run(out / "run").meta["epochs_run"] == 1
