"""Every bad command line ends in one line on stderr, a non-zero exit and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradlens import Snapshot
from gradlens.cli import main
from gradlens.store import RunWriter

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
SYNTH = ["--dataset", "synthetic", "--data-option", "n=100", "--epochs", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "run"
    with RunWriter(path, meta={"tasks": ["a", "b"]}) as w:
        for step in range(3):
            g = torch.tensor([[2.0, -1.0 + step], [-1.0 + step, 3.0]], dtype=torch.float64)
            w.add_snapshot(Snapshot(step, ("a", "b"), g, {"fc": g}, torch.ones(2)))
        w.add_eval({"a": {"accuracy": 0.9}, "b": {"accuracy": 0.8}}, split="val", point="final")
    return path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], match: str, code: int = 2) -> str:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err  # one line
    assert match in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["bench", "--tasks", "0"], "argument --tasks: should be comma-separated positive"),
        (["bench", "--tasks", "-2"], "argument --tasks"),
        (["bench", "--repeats", "0"], "argument --repeats: should be a positive integer"),
        (["bench", "--batch", "0"], "argument --batch: should be a positive integer"),
        (["demo", "--epochs", "0"], "argument --epochs: should be a positive integer"),
        (["heatmap", "RUN", "--dpi", "0"], "argument --dpi"),
        (["nosuch"], "invalid choice: 'nosuch'"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, match):
    _fails(capsys, argv, match)


def test_heatmap_refuses_an_output_it_cannot_write(capsys, run_dir, tmp_path):
    _fails(capsys, ["heatmap", str(run_dir), "--out", str(tmp_path / "x.txt")], "image format")
    assert not (tmp_path / "x.txt").exists()


def test_report_refuses_unknown_split_and_metric(capsys, run_dir):
    root = str(run_dir.parent)
    _fails(capsys, ["report", root, "--split", "nosuch"], "`--split` should be a split")
    _fails(capsys, ["report", root, "--split", "val", "--metric", "nosuch"], "`--metric`")


def test_report_and_heatmap_name_what_the_runs_lack(capsys, tmp_path):
    """Runs with no final evaluations: the report said '`--split` should be ... one of []' (no
    split could ever do); a one-task run's heatmap named the plotting function's argument."""
    for name, tasks in (("r1", ("a", "b")), ("single", ("only",))):
        with RunWriter(tmp_path / "runs" / name, meta={"tasks": list(tasks)}) as w:
            g = torch.eye(len(tasks), dtype=torch.float64)
            w.add_snapshot(Snapshot(0, tasks, g, {"fc": g}, torch.ones(len(tasks))))
    _fails(capsys, ["report", str(tmp_path / "runs"), "--no-progress"],
           "`DIR` should hold runs with final evaluations")  # fmt: skip
    _fails(capsys, ["heatmap", str(tmp_path / "runs" / "single")],
           "`RUN` should be a run of at least 2 tasks")  # fmt: skip


def test_file_system_errors_are_one_line(capsys, run_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    err = _fails(
        capsys, ["heatmap", str(run_dir), "--out", str(tmp_path / "file" / "h.png")], "error", 1
    )
    assert "file" in err
    _fails(capsys, ["heatmap", str(tmp_path / "nothing")], "no ")  # not a run: a StoreError


def test_train_refuses_a_missing_device_and_huge_models(capsys, tmp_path):
    out = str(tmp_path / "r")
    if not torch.cuda.is_available():
        _fails(capsys, ["train", *SYNTH, "--device", "cuda", "--out", out], "CUDA is not available")
    _fails(capsys, ["train", *SYNTH, "--width", "1e9", "--out", out], "too large to size")
    _fails(capsys, ["train", *SYNTH, "--depth", "100000", "--out", out], "pass --yes")
    _fails(capsys, ["train", *SYNTH, "--width", "50", "--out", out], "164,096,002 parameters")
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_sweep_of_too_many_runs_is_refused_before_enumerating(capsys, tmp_path):
    cfg = tmp_path / "big.toml"
    cfg.write_text('[train]\ndataset = "synthetic"\n[sweep]\ngrid = 100000000\n')
    _fails(capsys, ["sweep", str(cfg), "--out", str(tmp_path / "o")], "100,000,000 runs")
    cfg.write_text('[train]\ndataset = "synthetic"\n[sweep]\nrandom = 1000000000\n')
    out = str(tmp_path / "o")
    _fails(capsys, ["sweep", str(cfg), "--out", out, "--yes"], "more than 1,000,000")
    cfg.write_text('[train]\ndataset = "synthetic"\n[sweep]\nrandom = 1001\n')
    _fails(capsys, ["sweep", str(cfg), "--out", out], "pass --yes")
    assert not (tmp_path / "o").exists()  # refused before the sweep directory was made


def test_a_real_process_prints_no_traceback(tmp_path):
    """End to end through the console entry point: exit status and stderr as a user sees them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "gradlens.cli", "report", str(tmp_path / "nothing")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("gradlens report: error: ")
    assert proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_pbt_of_deep_members_needs_yes_and_huge_populations_are_refused(capsys, tmp_path):
    cfg = tmp_path / "deep.toml"
    train = (
        '[train]\ndataset = "synthetic"\ndataset_options = {n = 64}\nwidth = 0.05\ndepth = 65\n'
        "epochs = 1\n"
    )
    cfg.write_text(train + "[pbt]\npopulation = 2\n")
    out = tmp_path / "o"
    _fails(capsys, ["pbt", str(cfg), "--out", str(out), "--no-progress"], "pass --yes")
    assert main(["pbt", str(cfg), "--out", str(out), "--no-progress", "--yes"]) == 0
    assert "member" in capsys.readouterr().out
    cfg.write_text(train + "[pbt]\npopulation = 1000000000\n")
    _fails(capsys, ["pbt", str(cfg), "--out", str(tmp_path / "p")], "at most 1,000")
