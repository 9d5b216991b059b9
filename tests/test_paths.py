"""Nothing is written or deleted outside the directory the user named: hostile names everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlens import GradlensError
from gradlens._paths import check_name, inside, remove_tree
from gradlens.data import MultiDomainDataset, MultiTaskDataset, load_dataset
from gradlens.search import SearchConfig, plan_sweep, run_pbt, run_sweep
from gradlens.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HOSTILE = [
    "a/b",
    "a/../../../../victim/pwned",
    "..",
    ".",
    ".hidden",
    "a\\b",
    "nul\x00byte",
    "new\nline",
    "\u202egnp.exe",  # a bidi override
    " padded ",
    "",
    "x" * 101,
    "c:drive",
]
TINY = {
    "dataset": "synthetic",
    "dataset_options": {"n": 120},
    "width": 0.05,
    "depth": 1,
    "batch_size": 60,
    "epochs": 1,
    "every": 1000,
}


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim" / "pwned_seed0"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    return victim


@settings(max_examples=300)
@given(st.text(max_size=120))
def test_every_accepted_name_stays_inside_its_root(tmp_path_factory, name):
    root = tmp_path_factory.getbasetemp() / "root"
    try:
        check_name(name, "task name")
    except GradlensError:
        return
    inside(root, root / name)  # never raises for an accepted name
    inside(root, root / f"single-{name}_seed0")
    assert "/" not in name
    assert not name.startswith(".")


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_where_they_enter(tmp_path, name):
    with pytest.raises(GradlensError, match="should be a name usable as a file name"):
        check_name(name, "task name")
    with pytest.raises(GradlensError, match=r"`tasks(\[\])?` should be"):
        TrainConfig.from_dict({"tasks": [name, "ok"]})
    with pytest.raises(GradlensError, match="name usable as a file name"):
        MultiTaskDataset(torch.zeros(4, 2), {name: torch.zeros(4), "ok": torch.zeros(4)})
    with pytest.raises(GradlensError, match="name usable as a file name"):
        MultiDomainDataset(
            torch.zeros(4, 2), torch.zeros(4), torch.zeros(4), domains=[name, "ok"], n_classes=2
        )
    cfg = SearchConfig.from_dict({"train": {}, "sweep": {"p": [0.5], "baselines": True}})
    with pytest.raises(GradlensError, match="name usable as a file name"):
        plan_sweep(cfg, (name, "ok"))


def _hostile_celeba(root: Path) -> None:
    (root / "img_align_celeba").mkdir(parents=True)
    header = "a/b a/../../../../victim/pwned"
    (root / "list_attr_celeba.txt").write_text(f"1\n{header}\n000001.png 1 -1\n")


def test_hostile_celeba_header_deletes_nothing_outside_out(tmp_path):
    """The issue's exploit: a CelebA header naming ``a/../../../../victim/pwned``. The sweep
    is refused before anything is written, on the first run and on the rerun alike."""
    data = tmp_path / "data"
    _hostile_celeba(data)
    victim = _victim(tmp_path)
    with pytest.raises(GradlensError, match=r"attribute name in .*list_attr_celeba.txt"):
        load_dataset("celeba", root=data)
    out = tmp_path / "a" / "b" / "c" / "d" / "out"
    cfg = SearchConfig.from_dict({
        "train": {"dataset": "celeba", "dataset_options": {"root": str(data)}, "epochs": 1},
        "sweep": {"p": [0.5], "baselines": True},
    })  # fmt: skip
    for _ in range(2):
        with pytest.raises(GradlensError, match="name usable as a file name"):
            run_sweep(cfg, out, progress=False)
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not out.exists() or not any(out.iterdir())


def test_sweep_rerun_removes_a_planted_symlink_not_its_target(tmp_path):
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "w0.5-0.5_seed0").symlink_to(victim, target_is_directory=True)
    cfg = SearchConfig.from_dict({"train": TINY, "sweep": {"p": [0.5]}})
    df = run_sweep(cfg, out, progress=False)
    assert df.status.tolist() == ["done"]
    assert (victim / "precious.txt").read_text() == "keep me"
    assert not (out / "w0.5-0.5_seed0").is_symlink()


def test_tampered_pbt_state_cannot_reach_outside(tmp_path):
    victim = _victim(tmp_path)
    out = tmp_path / "pbt"
    cfg = SearchConfig.from_dict({
        "train": TINY, "pbt": {"population": 2, "epochs": 2, "interval_epochs": 1},
        "executor": {"workers": 1},
    })  # fmt: skip
    run_pbt(cfg, out, progress=False)
    state = json.loads((out / "pbt.json").read_text())
    state["status"] = "running"
    state["members"][0]["run_dir"] = "../victim/pwned_seed0"
    (out / "pbt.json").write_text(json.dumps(state))
    with pytest.raises(GradlensError, match="`run_dir` should be a name usable"):
        run_pbt(cfg, out, progress=False)
    state["members"][0]["run_dir"] = "member-000"
    state["members"][0]["checkpoint"] = "../victim/pwned_seed0/precious.txt"
    (out / "pbt.json").write_text(json.dumps(state))
    with pytest.raises(GradlensError, match=r"Refusing to use .*precious\.txt"):
        run_pbt(cfg, out, progress=False)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_inside_and_remove_tree_refuse_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    victim = _victim(tmp_path)
    for bad in (root, root / ".." / "victim", tmp_path, Path("/")):
        with pytest.raises(GradlensError, match="Refusing to use"):
            remove_tree(root, bad)
    (root / "link").symlink_to(victim, target_is_directory=True)
    with pytest.raises(GradlensError, match="outside"):
        inside(root, root / "link" / "precious.txt")  # resolves through the link
    remove_tree(root, root / "link")
    assert (victim / "precious.txt").exists()
    assert not (root / "link").exists()
