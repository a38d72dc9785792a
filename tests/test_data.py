"""Loaders read files the tests write in the real formats (IDX, gzipped IDX, CIFAR pickles)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from bpfree.data import DataError, load_dataset, read_idx, stratified_split


def write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(folder, n_train=30, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    write_idx(tmp_path / "x", array, gz)
    read = read_idx(tmp_path / ("x.gz" if gz else "x"))
    assert read.shape == (2, 3, 4) and (read == array).all()


@pytest.mark.parametrize("layout", ["flat-gz", "torchvision-raw"])
def test_mnist_loader_reads_real_format(tmp_path, layout):
    folder = tmp_path if layout == "flat-gz" else tmp_path / "MNIST" / "raw"
    arrays = write_mnist(folder, gz=layout == "flat-gz")
    data = load_dataset("mnist", tmp_path)
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (20, 1, 28, 28)
    assert data.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    # pixels are scaled to [0, 1] and standardised with MNIST's mean and std
    pixel = arrays["train-images-idx3-ubyte"][3, 5, 7] / 255.0
    assert data.train_x[3, 0, 5, 7].item() == pytest.approx((pixel - 0.1307) / 0.3081, rel=1e-5)


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    assert load_dataset("fashion-mnist", tmp_path).num_classes == 10


def test_validation_split_is_carved_from_train_and_stratified(tmp_path):
    write_mnist(tmp_path, n_train=100)
    data = load_dataset("mnist", tmp_path, val_fraction=0.2)
    assert len(data.train_x) == 80 and len(data.val_x) == 20
    assert torch.bincount(data.val_y, minlength=10).tolist() == [2] * 10
    assert len(data.test_x) == 20  # the test split is untouched
    keep, held = stratified_split(torch.arange(100) % 10, 0.2, seed=0)
    assert set(keep.tolist()).isdisjoint(held.tolist())


def write_cifar(root, name: str, n: int = 12):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True)
    for f in files:
        classes = 10 if name == "cifar10" else 100
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 key: [i % classes for i in range(n)]}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)
    return files


@pytest.mark.parametrize("name,classes,train_files", [("cifar10", 10, 5), ("cifar100", 100, 1)])
def test_cifar_loader_reads_pickle_batches(tmp_path, name, classes, train_files):
    write_cifar(tmp_path, name)
    data = load_dataset(name, tmp_path)
    assert data.num_classes == classes
    assert data.train_x.shape == (12 * train_files, 3, 32, 32) and data.test_x.shape == (12, 3, 32, 32)
    assert data.train_y[:12].tolist() == [i % classes for i in range(12)]


def test_missing_files_name_the_exact_path_and_flag(tmp_path):
    with pytest.raises(DataError, match=r"not found in .*--download"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("mnist", None)


def test_corrupt_idx_is_a_clear_error(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_mnist_5k_is_the_bundled_real_subset():
    data = load_dataset("mnist-5k")
    assert len(data.train_x) == 4000 and len(data.test_x) == 1000
    assert torch.bincount(data.test_y).tolist() == [100] * 10


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("n_labels,message", [
    (21, "20 train images but 21 labels"),  # 2,100 labels for 2,000 images, in small
    (19, "20 train images but 19 labels"),
])
def test_images_and_labels_must_be_as_many(tmp_path, gz, n_labels, message):
    write_mnist(tmp_path, n_train=20, gz=gz)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(n_labels) % 10, gz)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("mnist", tmp_path)
    assert "train-images-idx3-ubyte" in str(info.value)


@pytest.mark.parametrize("gz", [True, False])
def test_labels_outside_the_classes_are_refused(tmp_path, gz):
    write_mnist(tmp_path, n_test=20, gz=gz)
    labels = np.arange(20) % 10
    labels[7] = 10
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz)
    with pytest.raises(DataError, match=r"test label 10 is outside the 10 classes 0\.\.9"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[: len(raw) // 2], "not a complete gzip file"),  # a cut download
    (lambda raw: b"<html>404 Not Found</html>", "not a complete gzip file"),  # not gzip
])
def test_a_broken_gz_file_is_one_line_naming_it(tmp_path, damage, message):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_cifar_labels_and_images_are_checked(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch = {b"data": np.zeros((12, 3072), dtype=np.uint8), b"labels": list(range(11))}
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="12 test_batch images but 11 labels"):
        load_dataset("cifar10", tmp_path)
    batch[b"labels"] = [0] * 11 + [10]
    path.write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError, match="label 10 is outside the 10 classes"):
        load_dataset("cifar10", tmp_path)


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_cifar_batch_is_refused_without_running_it(tmp_path):
    """A CIFAR batch is a pickle: the loader admits only what the format holds, so a file
    that names any other callable is refused before it is called."""
    write_cifar(tmp_path, "cifar100")
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(pickle.dumps({b"data": Planted(marker), b"fine_labels": [0]}))
    with pytest.raises(DataError, match=r"names posix\.system.*refused") as info:
        load_dataset("cifar100", tmp_path)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_the_restricted_loader_reads_every_pickle_protocol(tmp_path, protocol):
    """Protocol 2 is the real files' (Python 2's cPickle); Python 3 writes 4 or 5."""
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.random.default_rng(0).integers(0, 256, (6, 3072), dtype=np.uint8)
    for name in ("train", "test"):
        batch = {b"data": data, b"fine_labels": [0, 5, 99, 3, 2, 1], b"filenames": [b"a.png"],
                 b"batch_label": b"training batch 1 of 1"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    loaded = load_dataset("cifar100", tmp_path)
    assert loaded.train_y.tolist() == [0, 5, 99, 3, 2, 1]
    expected = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255.0
    mean = torch.tensor((0.5071, 0.4865, 0.4409)).view(1, -1, 1, 1)
    std = torch.tensor((0.2673, 0.2564, 0.2762)).view(1, -1, 1, 1)
    assert torch.allclose(loaded.train_x, (expected - mean) / std, atol=1e-6)


def test_a_download_without_network_is_one_line(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path, download=True)
    message = str(info.value)
    assert message.startswith("--download of mnist failed") and "check the network" in message
    assert "\n" not in message
