"""Loaders for real data already on disk in their published layouts (never downloaded)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gradlens._errors import GradlensError, require
from gradlens._paths import check_name
from gradlens.data._base import (
    MultiDomainDataset,
    MultiTaskDataset,
    TaskInfo,
    _ImageSource,
    _rng,
    _split_indices,
)
from gradlens.data._digits import _select

__all__ = ["DOMAINNET_DOMAINS"]

#: The six DomainNet domains.
DOMAINNET_DOMAINS: tuple[str, ...] = (
    "clipart",
    "infograph",
    "painting",
    "quickdraw",
    "real",
    "sketch",
)
_CELEBA_PARTITION = {"0": "train", "1": "val", "2": "test"}
_TAG_CELEBA = 301
_TAG_DOMAINNET = 302
#: Fraction of each DomainNet domain's official train list held out as the validation split.
DOMAINNET_VAL_FRACTION = 0.15


def _image_size(image_size: object) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in image_size)
    ):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        size = (0, 0)
    if min(size) < 1:
        raise GradlensError(
            f"`image_size` should be a positive int or a (height, width) pair; found "
            f"{image_size!r}."
        )
    return size


def _reader(paths: list[Path], size: tuple[int, int]) -> _ImageSource:
    """Lazy RGB reader: sample i is ``paths[i]`` resized to ``size``, float32 (3, H, W), [0, 1]."""
    Image = require("PIL.Image", "data", "Reading CelebA / DomainNet images")

    def load(i: int) -> torch.Tensor:
        path = paths[i]
        try:
            with Image.open(path) as im:
                rgb = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                arr = np.asarray(rgb, dtype=np.float32) / 255.0
        except (OSError, ValueError) as exc:
            raise GradlensError(f"Cannot read image {path}: {exc}") from exc
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    return _ImageSource(len(paths), (3, *size), load)


def _root(root: Path | None, name: str) -> Path:
    if root is None:
        raise GradlensError(f"`root` is required for {name!r}: the folder holding the data.")
    if not root.is_dir():
        raise GradlensError(f"`root` should be an existing folder for {name!r}; found {root}.")
    return root


def _check_files_exist(folder: Path, names: Sequence[str], listed_in: Path) -> None:
    present = set(os.listdir(folder)) if folder.is_dir() else set()
    missing = [n for n in names if n not in present]
    if missing:
        raise GradlensError(
            f"{len(missing)} image(s) listed in {listed_in} are missing from {folder}, e.g. "
            f"{missing[:3]}."
        )


# --------------------------------------------------------------------------------------------
# CelebA
# --------------------------------------------------------------------------------------------


def _read_celeba_attributes(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``: (attribute names, file names, values in {0, 1})."""
    if not path.is_file():
        raise GradlensError(f"CelebA attribute file not found: expected {path}.")
    lines = path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise GradlensError(
            f"{path}: the first line must be the image count and the second the attribute names."
        )
    count = int(lines[0])
    names = lines[1].split()
    for n in names:  # attribute names become task names, then file names
        check_name(n, f"attribute name in {path}, line 2")
    files, rows = [], []
    for k, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1 or any(v not in ("1", "-1") for v in fields[1:]):
            raise GradlensError(
                f"{path}, line {k}: expected a file name and {len(names)} values of 1 or -1; "
                f"found {line.strip()!r}."
            )
        files.append(fields[0])
        rows.append([v == "1" for v in fields[1:]])
    if count != len(files):
        raise GradlensError(
            f"{path}: the header declares {count} images but {len(files)} are listed."
        )
    return names, files, np.asarray(rows, dtype=np.int64).reshape(len(files), len(names))


def _celeba_split(root: Path, files: list[str], split: str, seed: int) -> np.ndarray:
    """Indices of ``split`` from list_eval_partition.txt, else a seeded 70/15/15 split."""
    path = root / "list_eval_partition.txt"
    if not path.exists():
        return _split_indices(len(files), seed, _TAG_CELEBA)[split]
    part: dict[str, str] = {}
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or fields[1] not in _CELEBA_PARTITION:
            raise GradlensError(
                f"{path}, line {k}: expected '<file> 0|1|2'; found {line.strip()!r}."
            )
        part[fields[0]] = _CELEBA_PARTITION[fields[1]]
    missing = [f for f in files if f not in part]
    if missing:
        raise GradlensError(
            f"{path} gives no partition for {len(missing)} image(s), e.g. {missing[:3]}."
        )
    return np.array([i for i, f in enumerate(files) if part[f] == split], dtype=np.int64)


def _celeba(
    split: str,
    seed: int,
    root: Path | None,
    *,
    attributes: Sequence[str] | None = None,
    image_size: int | tuple[int, int] = 64,
) -> MultiTaskDataset:
    """CelebA from ``root/img_align_celeba`` and ``root/list_attr_celeba.txt``."""
    root = _root(root, "celeba")
    size = _image_size(image_size)
    names, files, values = _read_celeba_attributes(root / "list_attr_celeba.txt")
    chosen = _select("attributes", attributes, names, names)
    idx = _celeba_split(root, files, split, seed)
    img_dir = root / "img_align_celeba"
    if not img_dir.is_dir():
        raise GradlensError(f"CelebA image folder not found: expected {img_dir}.")
    picked = [files[i] for i in idx]
    _check_files_exist(img_dir, picked, root / "list_attr_celeba.txt")
    cols = {a: names.index(a) for a in chosen}
    info = TaskInfo("classification", 2)
    return MultiTaskDataset(
        _reader([img_dir / f for f in picked], size),
        {a: torch.from_numpy(values[idx, c].copy()) for a, c in cols.items()},
        task_info=dict.fromkeys(chosen, info),
        name="celeba",
        split=split,
        meta={"root": str(root), "files": picked},
    )


# --------------------------------------------------------------------------------------------
# DomainNet
# --------------------------------------------------------------------------------------------


def _read_domainnet_list(path: Path, domain: str) -> list[tuple[str, str, int]]:
    """Parse one split file: (relative path, class name, label) per line."""
    out = []
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        parts = fields[0].split("/") if fields else []
        if len(fields) != 2 or len(parts) != 3 or not fields[1].lstrip("-").isdigit():
            raise GradlensError(
                f"{path}, line {k}: expected '<domain>/<class>/<file> <label>'; found "
                f"{line.strip()!r}."
            )
        if parts[0] != domain:
            raise GradlensError(
                f"{path}, line {k}: the image {fields[0]!r} is in domain {parts[0]!r}, not "
                f"{domain!r}."
            )
        label = int(fields[1])
        if label < 0:
            raise GradlensError(f"{path}, line {k}: labels must be >= 0; found {label}.")
        out.append((fields[0], parts[1], label))
    return out


def _domainnet(
    split: str,
    seed: int,
    root: Path | None,
    *,
    domains: Sequence[str] | None = None,
    image_size: int | tuple[int, int] = 64,
) -> MultiDomainDataset:
    """DomainNet from ``root/<domain>/<class>/<img>`` and ``root/<domain>_{train,test}.txt``."""
    root = _root(root, "domainnet")
    size = _image_size(image_size)
    if domains is None:
        present = tuple(d for d in DOMAINNET_DOMAINS if (root / f"{d}_train.txt").is_file())
        if not present:
            raise GradlensError(
                f"No DomainNet split files in {root}: expected some of "
                f"{[f'{d}_train.txt' for d in DOMAINNET_DOMAINS]}."
            )
        domains = present
    chosen = _select("domains", domains, DOMAINNET_DOMAINS, DOMAINNET_DOMAINS)
    lists: dict[str, dict[str, list[tuple[str, str, int]]]] = {}
    for d in chosen:
        lists[d] = {}
        for part in ("train", "test"):
            path = root / f"{d}_{part}.txt"
            if not path.is_file():
                raise GradlensError(f"DomainNet split file not found for domain {d!r}: {path}.")
            lists[d][part] = _read_domainnet_list(path, d)
    class_of_label: dict[int, str] = {}
    for d in chosen:
        for part, rows in lists[d].items():
            for rel, cls, label in rows:
                if class_of_label.setdefault(label, cls) != cls:
                    raise GradlensError(
                        f"{root / f'{d}_{part}.txt'}: label {label} names class {cls!r} at "
                        f"{rel!r} but class {class_of_label[label]!r} elsewhere."
                    )
    if not class_of_label:
        raise GradlensError(f"The DomainNet split files in {root} list no images.")
    n_classes = max(class_of_label) + 1
    paths: list[Path] = []
    rels: list[str] = []
    dom: list[int] = []
    labels: list[int] = []
    for k, d in enumerate(chosen):
        rows = lists[d]["test" if split == "test" else "train"]
        if split != "test":
            perm = _rng(seed, _TAG_DOMAINNET, DOMAINNET_DOMAINS.index(d)).permutation(len(rows))
            n_val = round(DOMAINNET_VAL_FRACTION * len(rows))
            keep = np.sort(perm[:n_val] if split == "val" else perm[n_val:])
            rows = [rows[i] for i in keep]
        listed_in = root / f"{d}_{'test' if split == 'test' else 'train'}.txt"
        for rel, _, label in rows:
            path = root / rel
            if not path.is_file():
                raise GradlensError(f"Image {path} listed in {listed_in} does not exist.")
            paths.append(path)
            rels.append(rel)
            dom.append(k)
            labels.append(label)
    return MultiDomainDataset(
        _reader(paths, size),
        torch.tensor(dom, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        domains=chosen,
        n_classes=n_classes,
        name="domainnet",
        split=split,
        meta={
            "root": str(root),
            "files": rels,
            "classes": [class_of_label.get(i) for i in range(n_classes)],
        },
    )
