"""The per-run page of ``gradlens report``: a real profiled run drawn into one self-contained HTML
page (structure, escaping, figures that are not blank), the CLI, and a headless Chromium render."""

from __future__ import annotations

import base64
import io
import re

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

import gradlens as gl
from gradlens.cli import main
from gradlens.report import build_run_page
from tests._browser import needs_chromium, screenshot

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["left", "right", "<b>odd</b>"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 3-task run: 24 steps probed every 2, three epochs of val accuracy, final test scores."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("runs") / "r1"
    trunk = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    heads = torch.nn.ModuleList([torch.nn.Linear(8, 1) for _ in TASKS])
    opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=0.05)
    with gl.Profiler(trunk, TASKS, engine="gramian", every=2, store=path) as prof:
        for step in range(24):
            x = torch.randn(32, 6)
            ys = [x[:, 0], -x[:, 0] + 0.2 * x[:, 1], x[:, 2].sign()]
            z = trunk(x)
            losses = {t: (h(z).squeeze(1) - y).pow(2).mean() for t, h, y in zip(TASKS, heads, ys)}
            opt.zero_grad()
            prof.backward(losses)
            opt.step()
            if step % 8 == 7:
                epoch = step // 8 + 1
                scores = {t: {"accuracy": 0.5 + 0.1 * epoch} for t in TASKS}
                prof.store.add_eval(
                    scores, split="val", point=f"epoch:{epoch}", epoch=epoch, step=step
                )
        prof.store.add_eval({t: {"accuracy": 0.8} for t in TASKS}, split="test", point="final")
    return path


def test_run_page_structure_and_figures(run_dir, tmp_path):
    page = build_run_page(run_dir, tmp_path / "out", dpi=50)
    html = page.read_text()
    assert page == tmp_path / "out" / "run.html"
    # self-contained: no script, no external resource
    assert "<script" not in html
    assert not re.search(r'(src|href)="(?!data:)', html)
    # user strings escaped
    assert "<b>odd</b>" not in html
    assert "&lt;b&gt;odd&lt;/b&gt;" in html
    assert "Probed steps: 12, from 0 to 22." in html
    assert "Final evals:" in html
    # four figures, each a real picture with coloured cells or lines
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) == 4
    for data in pngs:
        img = mpimg.imread(io.BytesIO(base64.b64decode(data)), format="png")[..., :3]
        assert img.std() > 0.05
        assert (np.ptp(img, axis=2) > 0.2).mean() > 0.005
    # the per-layer table: the total and both trunk layers, with the values of Run.metrics
    run = gl.load_run(run_dir)
    m = run.metrics
    cos = m[(m.metric == "cosine") & (m.layer == "0")]["value"].to_numpy()
    row = re.search(r'<tr><td class="s">0</td><td>([^<]+)</td><td>([^<]+)</td>', html)
    assert float(row.group(1)) == pytest.approx(cos.mean(), abs=5e-4)
    assert float(row.group(2)) == pytest.approx((cos < 0).mean(), abs=5e-4)
    assert '<td class="s">all shared</td>' in html
    assert '<td class="s">2</td>' in html


def test_cli_writes_the_run_page_and_opens_it(run_dir, tmp_path, capsys, monkeypatch):
    opened = []
    monkeypatch.setattr("webbrowser.open", lambda uri: opened.append(uri) or True)
    out = tmp_path / "page"
    assert main(["report", str(run_dir), "--out", str(out), "--open"]) == 0
    assert f"wrote {out / 'run.html'}" in capsys.readouterr().out
    assert opened == [(out / "run.html").resolve().as_uri()]


def test_errors(tmp_path, capsys):
    with gl.RunWriter(tmp_path / "empty", meta={"tasks": ["a", "b"]}):
        pass
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "should hold at least one committed probed step" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report").exists()  # a failed call writes nothing
    with pytest.raises(gl.GradlensError, match="`dpi` should be an int >= 1; found 0"):
        build_run_page(tmp_path / "empty", dpi=0)


@needs_chromium
def test_run_page_renders_in_headless_chromium(run_dir, tmp_path):
    page = build_run_page(run_dir, tmp_path / "out", dpi=60)
    img = screenshot(page, tmp_path, 1200, 1600)
    dark = (img.max(axis=2) < 0.5).mean()  # text and figure ink
    assert dark > 0.005
    coloured = (np.ptp(img, axis=2) > 0.2).mean()  # heatmap colours
    assert coloured > 0.01
