"""Tests of gradlens.data: bundled digit datasets, synthetic data, on-disk loaders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from gradlens._errors import GradlensError
from gradlens.data import (
    DATASETS,
    DIGIT_ATTRIBUTES,
    DIGIT_DOMAINS,
    DOMAINNET_DOMAINS,
    SPLITS,
    MultiDomainDataset,
    MultiTaskDataset,
    TaskInfo,
    dataset_options,
    expected_gradient_cosine,
    expected_gradient_gram,
    load_dataset,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")
Image = pytest.importorskip("PIL.Image")

N_DIGITS = 1797
SPLIT_SIZES = {
    "train": round(0.7 * N_DIGITS),
    "val": round(0.15 * N_DIGITS),
    "test": N_DIGITS - round(0.7 * N_DIGITS) - round(0.15 * N_DIGITS),
}
BUNDLED = ("multidigits", "digit_attributes", "domain_digits", "synthetic")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = sklearn_datasets.load_digits()
    return bunch.images / 16.0, bunch.target


def _same(a: MultiTaskDataset, b: MultiTaskDataset) -> bool:
    (xa, ya), (xb, yb) = a.tensors(), b.tensors()
    return (
        torch.equal(xa, xb)
        and ya.keys() == yb.keys()
        and all(torch.equal(ya[k], yb[k]) for k in ya)
    )


# --------------------------------------------------------------------------------------------
# The common contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
@pytest.mark.parametrize("split", SPLITS)
def test_bundled_contract(name, split):
    ds = load_dataset(name, split, seed=0)
    X, Y = ds.tensors()
    assert isinstance(ds, MultiTaskDataset)
    assert X.dtype == torch.float32
    assert tuple(X.shape) == (len(ds), *ds.input_shape)
    assert ds.kind in ("multitask", "multidomain")
    assert set(ds.task_info) == set(ds.tasks)
    if ds.kind == "multitask":
        assert tuple(Y) == ds.tasks
    else:
        assert isinstance(ds, MultiDomainDataset)
        assert set(Y) == {"domain", "label"}
        assert int(ds.domain.max()) < len(ds.tasks)
    for t, info in ds.task_info.items():
        y = Y[t] if ds.kind == "multitask" else Y["label"]
        assert len(y) == len(ds)
        if info.kind == "classification":
            assert y.dtype == torch.long
            assert int(y.min()) >= 0
            assert int(y.max()) < info.n_outputs
        else:
            assert y.dtype == torch.float32
            assert torch.isfinite(y).all()
    x0, y0 = ds[0]
    assert torch.equal(x0, X[0])
    assert all(torch.equal(y0[k], Y[k][0]) for k in Y)


@pytest.mark.parametrize("name", BUNDLED)
def test_deterministic_under_seed_and_seed_matters(name):
    a = load_dataset(name, "val", seed=5)
    b = load_dataset(name, "val", seed=5)
    c = load_dataset(name, "val", seed=6)
    assert _same(a, b)
    assert not torch.equal(a.tensors()[0], c.tensors()[0])


def test_dataloader_collates_target_dicts():
    ds = load_dataset("domain_digits", "val", seed=0)
    x, y = next(iter(DataLoader(ds, batch_size=4)))
    X, Y = ds.tensors()
    assert torch.equal(x, X[:4])
    assert torch.equal(y["domain"], Y["domain"][:4])
    assert torch.equal(y["label"], Y["label"][:4])


def test_load_dataset_errors_list_valid_values():
    with pytest.raises(
        GradlensError, match=r"`name` should be one of .*'multidigits'.*'domainnet'"
    ):
        load_dataset("mnist")
    with pytest.raises(GradlensError, match=r"`split` should be one of \['train', 'val', 'test'\]"):
        load_dataset("multidigits", "validation")
    with pytest.raises(
        GradlensError, match=r"Unknown option\(s\) \['m'\].*valid options: \('n',\)"
    ):
        load_dataset("multidigits", m=3)
    with pytest.raises(GradlensError, match="`root` is not used"):
        load_dataset("synthetic", root="/tmp")
    with pytest.raises(GradlensError, match="`seed` should be an int >= 0"):
        load_dataset("synthetic", seed=-1)
    with pytest.raises(GradlensError, match="`root` is required for 'celeba'"):
        load_dataset("celeba")
    assert DATASETS == (
        "multidigits",
        "digit_attributes",
        "domain_digits",
        "synthetic",
        "multimnist",
        "digit_sources",
        "celeba",
        "domainnet",
    )
    assert set(dataset_options("synthetic")) == {"n_tasks", "angle", "scales", "dim", "n", "noise"}


def test_multitask_dataset_validates_inputs():
    with pytest.raises(GradlensError, match=r"`targets\['a'\]` should be a tensor with 3 rows"):
        MultiTaskDataset(torch.zeros(3, 2), {"a": torch.zeros(2)})
    with pytest.raises(GradlensError, match="at least one task"):
        MultiTaskDataset(torch.zeros(3, 2), {})
    with pytest.raises(GradlensError, match="`labels` must lie in"):
        MultiDomainDataset(
            torch.zeros(2, 1),
            torch.tensor([0, 1]),
            torch.tensor([0, 5]),
            domains=("a", "b"),
            n_classes=3,
        )
    with pytest.raises(GradlensError, match="`kind` should be one of"):
        TaskInfo("ranking", 2)  # type: ignore[arg-type]
    ds = MultiTaskDataset(torch.zeros(3, 2), {"r": torch.zeros(3, 4)})
    assert ds.task_info["r"] == TaskInfo("regression", 4)
    with pytest.raises(IndexError):
        ds[3]


# --------------------------------------------------------------------------------------------
# Splits of the digits: sizes and no leakage
# --------------------------------------------------------------------------------------------


def test_digit_splits_sizes_partition_and_no_leakage():
    idx = {s: load_dataset("digit_attributes", s, seed=1).meta["index"] for s in SPLITS}
    assert {s: len(v) for s, v in idx.items()} == SPLIT_SIZES
    assert np.array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(N_DIGITS))
    pairs = {s: load_dataset("multidigits", s, seed=1, n=500).meta for s in SPLITS}
    domains = {s: load_dataset("domain_digits", s, seed=1).meta["index"] for s in SPLITS}
    for s in SPLITS:
        allowed = set(idx[s].tolist())
        assert set(pairs[s]["left_index"].tolist()) <= allowed
        assert set(pairs[s]["right_index"].tolist()) <= allowed
        assert set(domains[s].tolist()) <= allowed
    other = load_dataset("digit_attributes", "train", seed=2).meta["index"]
    assert not np.array_equal(other, idx["train"])


# --------------------------------------------------------------------------------------------
# MultiDigits
# --------------------------------------------------------------------------------------------


def test_multidigits_images_are_the_two_digits(digits):
    images, labels = digits
    ds = load_dataset("multidigits", "train", seed=0)
    X, Y = ds.tensors()
    assert ds.tasks == ("left", "right")
    assert ds.input_shape == (1, 8, 16)
    assert len(ds) == 6000
    assert len(load_dataset("multidigits", "test", n=17)) == 17
    li, ri = ds.meta["left_index"], ds.meta["right_index"]
    np.testing.assert_allclose(X[:, 0, :, :8].numpy(), images[li], atol=1e-7)
    np.testing.assert_allclose(X[:, 0, :, 8:].numpy(), images[ri], atol=1e-7)
    assert torch.equal(Y["left"], torch.from_numpy(labels[li]))
    assert torch.equal(Y["right"], torch.from_numpy(labels[ri]))
    assert set(Y["left"].tolist()) == set(range(10)) == set(Y["right"].tolist())
    with pytest.raises(GradlensError, match="`n` should be an int >= 1"):
        load_dataset("multidigits", n=0)


# --------------------------------------------------------------------------------------------
# DigitAttributes
# --------------------------------------------------------------------------------------------


def test_digit_attributes_definitions(digits):
    images, labels = digits
    ds = load_dataset("digit_attributes", "train", seed=0, tasks=list(DIGIT_ATTRIBUTES))
    X, Y = ds.tensors()
    assert len(DIGIT_ATTRIBUTES) == 12
    assert ds.tasks == tuple(DIGIT_ATTRIBUTES)
    idx = ds.meta["index"]
    img, c = images[idx], labels[idx]
    np.testing.assert_allclose(X[:, 0].numpy(), img, atol=1e-7)
    ink = images.sum(axis=(1, 2))
    center = images[:, 2:6, 2:6].sum(axis=(1, 2))
    expected = {
        "digit": c,
        "parity": c % 2,
        "greater_than_4": c >= 5,
        "prime": np.isin(c, [2, 3, 5, 7]),
        "closed_loop": np.isin(c, [0, 6, 8, 9]),
        "heavy_ink": ink[idx] > np.median(ink),
        "mod3": c % 3,
        "square": np.isin(c, [0, 1, 4, 9]),
        "fibonacci": np.isin(c, [0, 1, 2, 3, 5, 8]),
        "top_heavy": img[:, :4].sum(axis=(1, 2)) > img[:, 4:].sum(axis=(1, 2)),
        "left_heavy": img[:, :, :4].sum(axis=(1, 2)) > img[:, :, 4:].sum(axis=(1, 2)),
        "center_ink": center[idx] > np.median(center),
    }
    for t, want in expected.items():
        assert np.array_equal(Y[t].numpy(), want.astype(np.int64)), t
        # every class of every attribute occurs in the training split
        assert len(set(Y[t].tolist())) == ds.task_info[t].n_outputs, t


def test_digit_attributes_task_selection():
    assert len(load_dataset("digit_attributes").tasks) == 6
    ds = load_dataset("digit_attributes", "val", tasks=["prime", "mod3"])
    assert ds.tasks == ("prime", "mod3")
    assert ds.task_info["mod3"] == TaskInfo("classification", 3)
    with pytest.raises(GradlensError, match=r"`tasks` has unknown names \['odd'\]; valid: \("):
        load_dataset("digit_attributes", tasks=["odd"])
    with pytest.raises(GradlensError, match="non-empty list of distinct names"):
        load_dataset("digit_attributes", tasks=["prime", "prime"])


# --------------------------------------------------------------------------------------------
# DomainDigits
# --------------------------------------------------------------------------------------------


def test_domain_digits_sizes_and_transforms(digits):
    images, labels = digits
    ds = load_dataset("domain_digits", "train", seed=0)
    assert ds.tasks == tuple(DIGIT_DOMAINS)
    assert ds.n_classes == 10
    sizes = ds.domain_counts().tolist()
    assert sizes == [ds.meta["sizes"][d] for d in ds.tasks]
    assert len(set(sizes)) == len(sizes)  # the domains differ in size
    X, Y = ds.tensors()
    idx = ds.meta["index"]
    assert torch.equal(Y["label"], torch.from_numpy(labels[idx]))
    assert float(X.min()) >= 0.0
    assert float(X.max()) <= 1.0
    base = images[idx]
    for k, d in enumerate(ds.tasks):
        m = (ds.domain == k).numpy()
        x = X[m, 0].numpy()
        if d == "original":
            np.testing.assert_allclose(x, base[m], atol=1e-7)
        elif d == "inverted":
            np.testing.assert_allclose(x, 1.0 - base[m], atol=1e-7)
        elif d == "blurred":
            k1 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
            ref = F.conv2d(
                torch.from_numpy(base[m][:, None]),
                torch.from_numpy(np.outer(k1, k1))[None, None],
                padding=2,
            )
            np.testing.assert_allclose(x, ref[:, 0].numpy(), atol=1e-6)
        elif d == "shifted":
            # a translation keeps the ink (up to what falls off the border), never adds any
            assert np.all(x.sum(axis=(1, 2)) <= base[m].sum(axis=(1, 2)) + 1e-5)
            assert not np.allclose(x, base[m])
        else:  # rotated, noisy: changed, same mean ink within reason
            assert np.abs(x - base[m]).mean() > 0.05


def test_domain_digits_options():
    ds = load_dataset("domain_digits", "train", domains=["noisy", "original"], sizes=[30, 70])
    assert ds.tasks == ("noisy", "original")
    assert ds.domain_counts().tolist() == [30, 70]
    full = load_dataset("domain_digits", "train", sizes=dict.fromkeys(DIGIT_DOMAINS, 30))
    # a domain's samples depend on the seed and the domain only, not on the other domains chosen
    X1, X2 = ds.tensors()[0], full.tensors()[0]
    noisy1 = X1[ds.domain == 0]
    noisy2 = X2[full.domain == list(DIGIT_DOMAINS).index("noisy")]
    assert torch.equal(
        torch.sort(noisy1.flatten(1), dim=0)[0], torch.sort(noisy2.flatten(1), dim=0)[0]
    )
    assert load_dataset("domain_digits", "val", sizes=400).domain_counts().tolist() == [400] * 6
    with pytest.raises(GradlensError, match="one size per domain"):
        load_dataset("domain_digits", sizes=[1, 2])
    with pytest.raises(GradlensError, match="exactly the domains"):
        load_dataset("domain_digits", domains=["noisy"], sizes={"blurred": 3})
    with pytest.raises(GradlensError, match=r"`domains` has unknown names \['sepia'\]"):
        load_dataset("domain_digits", domains=["sepia"])


# --------------------------------------------------------------------------------------------
# Synthetic data with planted structure
# --------------------------------------------------------------------------------------------


@settings(max_examples=25)
@given(n_tasks=st.integers(1, 6), frac=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_synthetic_directions_are_equiangular(n_tasks, frac, seed):
    lo = -1.0 / (n_tasks - 1) if n_tasks > 1 else -1.0
    angle = math.degrees(math.acos(lo + frac * (1.0 - lo)))
    ds = load_dataset("synthetic", "test", seed=seed, n_tasks=n_tasks, angle=angle, dim=8, n=20)
    U = ds.meta["directions"]
    C = (1 - math.cos(math.radians(angle))) * np.eye(n_tasks) + math.cos(math.radians(angle))
    np.testing.assert_allclose(U @ U.T, C, atol=1e-9)


def test_synthetic_design_and_directions_shared_across_splits():
    tr = load_dataset("synthetic", "train", seed=4, n_tasks=3, angle=100, dim=10, noise=0.5)
    va = load_dataset("synthetic", "val", seed=4, n_tasks=3, angle=100, dim=10, noise=0.5)
    np.testing.assert_array_equal(tr.meta["directions"], va.meta["directions"])
    X, Y = tr.tensors()
    X64 = X.double()
    np.testing.assert_allclose((X64.T @ X64 / len(X)).numpy(), np.eye(10), atol=1e-5)
    U = torch.from_numpy(tr.meta["directions"])
    for k, t in enumerate(tr.tasks):
        resid = Y[t].double() - X64 @ U[k]
        # the noise is orthogonal to the design and has the requested standard deviation
        assert float((X64.T @ resid).abs().max()) < 1e-3
        assert abs(float(resid.std()) - 0.5) < 0.05
    assert tr.task_info["task0"] == TaskInfo("regression", 1)


def test_synthetic_infeasible_angle_and_bad_options():
    load_dataset("synthetic", n_tasks=2, angle=180)
    load_dataset("synthetic", n_tasks=3, angle=120)
    with pytest.raises(GradlensError, match=r"infeasible for 3 equiangular tasks.*-0\.5000"):
        load_dataset("synthetic", n_tasks=3, angle=121)
    with pytest.raises(GradlensError, match="`scales` should hold 2 positive"):
        load_dataset("synthetic", scales=(1.0, -1.0))
    with pytest.raises(GradlensError, match="`dim` should be an int >= 5; found 4"):
        load_dataset("synthetic", n_tasks=5, dim=4)
    with pytest.raises(GradlensError, match="`n` should be an int >= 17; found 16"):
        load_dataset("synthetic", dim=16, n=16)
    with pytest.raises(GradlensError, match=r"`angle` should be a finite number >= 0 and <= 180"):
        expected_gradient_cosine(2, 200.0)


def _task_gram(X: torch.Tensor, Y: dict[str, torch.Tensor], tasks, v: torch.Tensor) -> torch.Tensor:
    """Gram of per-task gradients (plain autograd) on a zero-initialised shared linear layer."""
    trunk = torch.nn.Linear(X.shape[1], len(v), bias=False).double()
    torch.nn.init.zeros_(trunk.weight)
    grads = []
    for t in tasks:
        pred = trunk(X) @ v
        loss = 0.5 * ((pred - Y[t].double()) ** 2).mean()
        (g,) = torch.autograd.grad(loss, trunk.weight)
        grads.append(g.flatten())
    J = torch.stack(grads)
    return J @ J.T


def test_full_batch_gradient_gram_matches_closed_form():
    kw = {"n_tasks": 3, "angle": 75.0, "scales": (1.0, 2.0, 0.5), "dim": 12, "noise": 0.3}
    ds = load_dataset("synthetic", "train", seed=3, n=600, **kw)
    X, Y = ds.tensors()
    v = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = _task_gram(X.double(), Y, ds.tasks, v) / v.dot(v)
    expected = expected_gradient_gram(3, 75.0, (1.0, 2.0, 0.5))
    # exact up to the float32 rounding of the stored data
    torch.testing.assert_close(G, expected, rtol=1e-6, atol=1e-6)
    cos = G / torch.outer(G.diagonal().sqrt(), G.diagonal().sqrt())
    torch.testing.assert_close(cos, expected_gradient_cosine(3, 75.0), rtol=0, atol=1e-6)


def test_minibatch_gradient_gram_matches_expectation():
    kw = {"n_tasks": 2, "angle": 120.0, "scales": (1.0, 3.0), "dim": 8, "noise": 1.0}
    ds = load_dataset("synthetic", "train", seed=0, n=4000, **kw)
    X, Y = ds.tensors()
    X = X.double()
    v = torch.ones(1, dtype=torch.float64)
    b, n_batches = 32, 1000
    gen = torch.Generator().manual_seed(1)
    grams, cosines = [], []
    for _ in range(n_batches):
        idx = torch.randperm(len(X), generator=gen)[:b]
        G = _task_gram(X[idx], {t: y[idx] for t, y in Y.items()}, ds.tasks, v)
        grams.append(G)
        cosines.append(G[0, 1] / (G[0, 0] * G[1, 1]).sqrt())
    mean_gram = torch.stack(grams).mean(0)
    want = expected_gradient_gram(2, 120.0, (1.0, 3.0), noise=1.0, dim=8, batch_size=b)
    # Monte-Carlo error of 1000 batches plus the O(1/n) effect of the whitened design: 5 %
    torch.testing.assert_close(mean_gram, want, rtol=0.05, atol=0.05)
    want_cos = expected_gradient_cosine(2, 120.0, (1.0, 3.0), noise=1.0, dim=8, batch_size=b)
    # the mean of cosines differs from the cosine of the mean Gram at O(1/b): 0.03 at b = 32
    assert abs(float(torch.stack(cosines).mean()) - float(want_cos[0, 1])) < 0.03
    # the planted cosine is attenuated by minibatch noise, and recovered with the full batch
    assert float(want_cos[0, 1]) > math.cos(math.radians(120.0)) + 0.02


# --------------------------------------------------------------------------------------------
# CelebA and DomainNet fixture trees, in their published formats
# --------------------------------------------------------------------------------------------

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
)


def _write_image(path: Path, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


def _celeba_tree(root: Path, n: int = 12, ext: str = "png", partition: bool = True):
    rng = np.random.default_rng(0)
    (root / "img_align_celeba").mkdir(parents=True)
    files = [f"{i + 1:06d}.{ext}" for i in range(n)]
    pixels = {f: _write_image(root / "img_align_celeba" / f, rng) for f in files}
    values = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRIBUTES)))
    lines = [str(n), " ".join(CELEBA_ATTRIBUTES)]
    lines += [f + " " + " ".join(f"{v:2d}" for v in row) for f, row in zip(files, values)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    parts = [i % 3 if i >= 3 else 0 for i in range(n)]  # 6 train, 3 val, 3 test
    if partition:
        (root / "list_eval_partition.txt").write_text(
            "".join(f"{f} {p}\n" for f, p in zip(files, parts))
        )
    return files, pixels, values, parts


def test_celeba_reads_the_published_layout(tmp_path):
    files, pixels, values, parts = _celeba_tree(tmp_path)
    for s, code in zip(SPLITS, (0, 1, 2)):
        ds = load_dataset("celeba", s, root=tmp_path, image_size=16)
        rows = [i for i, p in enumerate(parts) if p == code]
        assert len(ds) == len(rows)
        assert ds.tasks == tuple(CELEBA_ATTRIBUTES)
        assert ds.input_shape == (3, 16, 16)
        X, Y = ds.tensors()
        for j, i in enumerate(rows):
            want = torch.from_numpy(pixels[files[i]].transpose(2, 0, 1) / 255.0).float()
            torch.testing.assert_close(X[j], want)
        for k, a in enumerate(CELEBA_ATTRIBUTES):
            assert Y[a].tolist() == [int(values[i, k] == 1) for i in rows]
            assert ds.task_info[a] == TaskInfo("classification", 2)


def test_celeba_options_jpeg_and_seeded_split(tmp_path):
    _celeba_tree(tmp_path, n=20, ext="jpg", partition=False)
    ds = load_dataset(
        "celeba", "train", root=tmp_path, attributes=["Smiling", "Male"], image_size=(8, 12)
    )
    assert ds.tasks == ("Smiling", "Male")
    assert len(ds) == 14
    x, y = ds[0]
    assert x.shape == (3, 8, 12)
    assert float(x.min()) >= 0.0
    assert float(x.max()) <= 1.0
    assert set(y) == {"Smiling", "Male"}
    again = load_dataset(
        "celeba", "train", root=tmp_path, attributes=["Smiling", "Male"], image_size=(8, 12)
    )
    assert _same(ds, again)
    splits = [set(load_dataset("celeba", s, root=tmp_path).meta["files"]) for s in SPLITS]
    assert [len(s) for s in splits] == [14, 3, 3]
    assert len(set.union(*splits)) == 20
    with pytest.raises(GradlensError, match=r"`attributes` has unknown names \['Grumpy'\]"):
        load_dataset("celeba", root=tmp_path, attributes=["Grumpy"])
    with pytest.raises(GradlensError, match="`image_size` should be a positive int"):
        load_dataset("celeba", root=tmp_path, image_size=0)


def test_celeba_malformed_trees(tmp_path):
    files, *_ = _celeba_tree(tmp_path)
    attr = tmp_path / "list_attr_celeba.txt"
    text = attr.read_text()
    attr.write_text(text.replace("12\n", "13\n", 1))
    with pytest.raises(GradlensError, match="declares 13 images but 12 are listed"):
        load_dataset("celeba", root=tmp_path)
    attr.write_text(text.replace(" 1", " 0", 1))
    with pytest.raises(GradlensError, match=r"list_attr_celeba.txt, line 3: expected a file name"):
        load_dataset("celeba", root=tmp_path)
    attr.unlink()
    with pytest.raises(GradlensError, match=r"CelebA attribute file not found.*list_attr_celeba"):
        load_dataset("celeba", root=tmp_path)
    attr.write_text(text)
    (tmp_path / "img_align_celeba" / files[0]).unlink()
    with pytest.raises(GradlensError, match=r"missing from .*img_align_celeba.*000001\.png"):
        load_dataset("celeba", root=tmp_path)
    (tmp_path / "img_align_celeba" / files[0]).write_bytes(b"not an image")
    ds = load_dataset("celeba", root=tmp_path, image_size=16)
    with pytest.raises(GradlensError, match=r"Cannot read image .*000001\.png"):
        ds[0]
    with pytest.raises(GradlensError, match=r"Cannot read image .*000001\.png"):
        ds.tensors()
    (tmp_path / "list_eval_partition.txt").write_text(f"{files[0]} 7\n")
    with pytest.raises(GradlensError, match=r"list_eval_partition.txt, line 1: expected"):
        load_dataset("celeba", root=tmp_path)
    with pytest.raises(GradlensError, match="`root` should be an existing folder"):
        load_dataset("celeba", root=tmp_path / "nowhere")


DN_CLASSES = ("apple", "bicycle", "cat")


def _domainnet_tree(root: Path, domains=("real", "sketch"), per_class=(6, 2)):
    """root/<domain>/<class>/<file>.jpg with <domain>_train.txt / <domain>_test.txt."""
    rng = np.random.default_rng(1)
    listed = {}
    for d in domains:
        for part, count in zip(("train", "test"), per_class):
            lines = []
            for label, cls in enumerate(DN_CLASSES):
                (root / d / cls).mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    rel = f"{d}/{cls}/{cls}_{part}_{i:03d}.jpg"
                    _write_image(root / rel, rng, size=12)
                    lines.append(f"{rel} {label}")
            (root / f"{d}_{part}.txt").write_text("\n".join(lines) + "\n")
            listed[d, part] = lines
    return listed


def test_domainnet_reads_the_published_layout(tmp_path):
    listed = _domainnet_tree(tmp_path)
    sets = {}
    for s in SPLITS:
        ds = load_dataset("domainnet", s, root=tmp_path, image_size=8)
        assert isinstance(ds, MultiDomainDataset)
        assert ds.kind == "multidomain"
        assert ds.tasks == ("real", "sketch")
        assert ds.n_classes == 3
        assert ds.meta["classes"] == list(DN_CLASSES)
        X, Y = ds.tensors()
        assert X.shape == (len(ds), 3, 8, 8)
        assert torch.equal(Y["domain"], ds.domain)
        assert torch.equal(Y["label"], ds.labels)
        lines = [f"{f} {y}" for f, y in zip(ds.meta["files"], ds.labels.tolist())]
        assert [f.split("/")[0] for f in ds.meta["files"]] == [ds.tasks[k] for k in ds.domain]
        sets[s] = set(lines)
    for d in ("real", "sketch"):
        train_file, test_file = set(listed[d, "train"]), set(listed[d, "test"])
        ours = {s: {line for line in sets[s] if line.startswith(d)} for s in SPLITS}
        assert ours["test"] == test_file
        assert ours["train"] | ours["val"] == train_file
        assert not ours["train"] & ours["val"]
        assert len(ours["val"]) == round(0.15 * len(train_file))
    one = load_dataset("domainnet", "test", root=tmp_path, domains=["sketch"], image_size=8)
    assert one.tasks == ("sketch",)
    assert one.domain_counts().tolist() == [6]
    assert _same(
        one, load_dataset("domainnet", "test", root=tmp_path, domains=["sketch"], image_size=8)
    )


def test_domainnet_malformed_trees(tmp_path):
    _domainnet_tree(tmp_path)
    with pytest.raises(GradlensError, match=r"`domains` has unknown names \['cartoon'\]; valid: "):
        load_dataset("domainnet", root=tmp_path, domains=["cartoon"])
    with pytest.raises(
        GradlensError,
        match=r"split file not found for domain 'clipart'.*"
        r"clipart_train\.txt",
    ):
        load_dataset("domainnet", root=tmp_path, domains=["clipart"])
    test_file = tmp_path / "sketch_test.txt"
    good = test_file.read_text()
    test_file.write_text(good.replace("sketch/apple", "real/apple", 1))
    with pytest.raises(
        GradlensError,
        match=r"sketch_test\.txt, line 1: the image .* is in domain "
        r"'real', not 'sketch'",
    ):
        load_dataset("domainnet", "test", root=tmp_path)
    test_file.write_text(good.replace(" 0\n", " 2\n", 1))
    with pytest.raises(GradlensError, match="label 2 names class 'apple'"):
        load_dataset("domainnet", "test", root=tmp_path)
    test_file.write_text(good.replace(" 0\n", " zero\n", 1))
    with pytest.raises(GradlensError, match=r"line 1: expected '<domain>/<class>/<file> <label>'"):
        load_dataset("domainnet", "test", root=tmp_path)
    test_file.write_text(good)
    victim = tmp_path / good.split()[0]
    victim.unlink()
    with pytest.raises(GradlensError, match=r"Image .*apple_test_000\.jpg listed in .*sketch_test"):
        load_dataset("domainnet", "test", root=tmp_path)
    victim.write_bytes(b"\xff\xd8 truncated")
    ds = load_dataset("domainnet", "test", root=tmp_path, domains=["sketch"])
    with pytest.raises(GradlensError, match=r"Cannot read image .*apple_test_000\.jpg"):
        ds[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GradlensError, match=r"No DomainNet split files .*clipart_train\.txt"):
        load_dataset("domainnet", root=empty)
    assert DOMAINNET_DOMAINS == ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
