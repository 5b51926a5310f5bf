"""Datasets as whole tensors on the device, plus stateless, rank-sharded, batch-augmented batches.

    ds = load_dataset("cifar10", train_size=10_000, preprocess="paper", device="cuda")
    batches = TrainBatches(ds, batch_size=1000, rank=r, world_size=w, seed=0)
    x, y = batches.get(step)          # this rank's share of global batch `step`, augmented
    for x, y in test_batches(ds, 500, rank=r, world_size=w): ...

Where the files come from (cifar10, cifar100, mnist, fashion_mnist), first hit wins:
  1. the `data_dir` argument            4. Debian's /usr/share/datasets/<name> (e.g. package dataset-fashion-mnist)
  2. $HARNESS_DATA_DIR                  5. a torchvision download into the cache dir
  3. $XDG_CACHE_HOME/harness/data (default ~/.cache/harness/data)
Each place may hold torchvision's layout (<root>/cifar-10-batches-py/, <root>/MNIST/raw/), the original files
flat in <root>, or either of those in <root>/<name>/. IDX files may be gzipped or not. The download is skipped
with download=False or HARNESS_NO_DOWNLOAD=1; when nothing is found, DataNotFoundError says where it looked.
The download is atomic (temporary folder, verified, renamed) and happens once per node: concurrent trials wait
on a file lock in the cache dir and then load what the first one left.
`digits` is scikit-learn's bundled 8x8 digits set and never needs files.

Randomness is keyed, never stateful: the training subset by (seed), an epoch's order by (seed, epoch), a global
batch's augmentation by (seed, step). So a resumed run continues exactly, and what rank r sees is the same
slice of the same global batch whatever the world size.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import tempfile
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "digits")
PREPROCESS = ("paper", "mean", "standard", "pixel_standard", "none")
DEBIAN_DATA_ROOT = Path("/usr/share/datasets")  # a module constant so tests can point it elsewhere

_CIFAR = {  # name: (torchvision class name, classes, label key)
    "cifar10": ("CIFAR10", 10, "labels"),
    "cifar100": ("CIFAR100", 100, "fine_labels"),
}
_IDX = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # name: torchvision class name (10 classes each)
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataNotFoundError(FileNotFoundError):
    """No place held the dataset's files and the download was off or failed. The message is one line."""


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # float32 [N, C, H, W], preprocessed, on the device
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: str  # "paper": random horizontal mirror; "standard": pad-4 random crop + mirror; "none"
    val_x: torch.Tensor | None = None  # held out of the training set (val_size), preprocessed like the test set
    val_y: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]


def _seed(*key) -> int:
    """A 63-bit generator seed from a key like ("epoch", seed, epoch); distinct keys give unrelated streams."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -----------------------------------------------------------------------------
# reading the original files


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (MNIST's format: big-endian header, then uint8 data), gzipped or not, as a uint8 tensor.

    torchvision's read_image_file/read_label_file do the same but only for uncompressed files; the flat folders we
    accept (Debian's, the original download) hold the .gz files, so we parse the 4-line header here.
    """
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file (header {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    flat = torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8)
    if flat.numel() != math.prod(shape):
        raise ValueError(f"{path} has {flat.numel()} values, its header says {shape}")
    return flat.view(*shape)


def _find_idx(folder: Path) -> list[Path] | None:
    """The 4 MNIST-format files in `folder` (each plain or .gz), or None if any is missing."""
    found = []
    for stem in _IDX_FILES:
        hits = [folder / f for f in (stem, stem + ".gz") if (folder / f).is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return found


def _load_idx_folder(folder: Path):
    train_x, train_y, test_x, test_y = (_read_idx(p) for p in _find_idx(folder))
    return train_x[:, None], train_y.long(), test_x[:, None], test_y.long()  # images [N, 1, 28, 28]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python-format batches are pickled dicts of numpy arrays and lists. Unpickle them like torchvision
    (encoding="latin1" for the Python 2 pickles) but refuse any other global, so a stray file can't run code."""

    ALLOWED: typing.ClassVar[frozenset] = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol-2 pickles
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    })

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch file references {module}.{name}; only numpy arrays allowed")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str):
    with open(path, "rb") as f:
        entry = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}  # b"data" or "data"
    x = torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    return x, torch.as_tensor(entry[label_key], dtype=torch.int64)


def _cifar_files(name: str, folder: Path) -> tuple[list[Path], list[Path]] | None:
    """The train and test batch files of torchvision's CIFAR class in `folder`, or None if any is missing.
    We read them ourselves instead of through the class, which would also demand torchvision's md5 of each file."""
    import torchvision

    cls = getattr(torchvision.datasets, _CIFAR[name][0])
    train = [folder / f for f, _md5 in cls.train_list]
    test = [folder / f for f, _md5 in cls.test_list]
    return (train, test) if all(p.is_file() for p in train + test) else None


def _load_cifar_folder(name: str, folder: Path):
    train, test = _cifar_files(name, folder)
    label_key = _CIFAR[name][2]
    tr = [_read_cifar_batch(p, label_key) for p in train]
    te = [_read_cifar_batch(p, label_key) for p in test]
    return torch.cat([x for x, _ in tr]), torch.cat([y for _, y in tr]), torch.cat([x for x, _ in te]), \
        torch.cat([y for _, y in te])


def _load_digits():
    """scikit-learn's bundled 8x8 digits (values 0..16), split 1437/360 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None]  # [1797, 1, 8, 8]
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=360, stratify=d.target, random_state=0)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


# -----------------------------------------------------------------------------
# finding the files


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "harness" / "data"


def _places(name: str, data_dir) -> list[tuple[str, Path | None]]:
    """(label, root) in search order; root None means that place is not configured (named in errors only)."""
    env = os.environ.get("HARNESS_DATA_DIR")
    places = [("data_dir", Path(data_dir).expanduser())] if data_dir is not None else []
    places.append(("HARNESS_DATA_DIR", Path(env).expanduser() if env else None))
    places.append(("cache", cache_dir()))
    places.append(("Debian", DEBIAN_DATA_ROOT / name.replace("_", "-")))  # e.g. /usr/share/datasets/fashion-mnist
    return places


def _candidate_folders(name: str, root: Path) -> list[Path]:
    """Where in `root` the files may lie: torchvision's layout, flat, or either one level down in <root>/<name>."""
    import torchvision

    if name in _CIFAR:
        sub = getattr(torchvision.datasets, _CIFAR[name][0]).base_folder  # cifar-10-batches-py, cifar-100-python
    else:
        sub = f"{_IDX[name]}/raw"  # MNIST/raw, FashionMNIST/raw
    folders = []
    for base in (root, root / name, root / name.replace("_", "-")):
        for folder in (base / sub, base):
            if folder not in folders:
                folders.append(folder)
    return folders


def _load_from(name: str, root: Path):
    """The raw tensors (uint8 images [N, C, H, W], int64 labels) from the first matching folder in root, or None."""
    for folder in _candidate_folders(name, root):
        if name in _CIFAR and _cifar_files(name, folder):
            return _load_cifar_folder(name, folder)
        if name in _IDX and _find_idx(folder):
            return _load_idx_folder(folder)
    return None


def _download(name: str, root: Path) -> None:
    """torchvision's download into `root` (its own layout, which _load_from then finds)."""
    import torchvision

    cls = getattr(torchvision.datasets, _CIFAR[name][0] if name in _CIFAR else _IDX[name])
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def _prepare_in_cache(name: str, cache: Path):
    """Download `name` into the cache once per node, whatever the number of trials asking at the same time.

    A file lock per dataset serialises the processes of one node (eight one-GPU trials start together on a p4d);
    the first downloads into a temporary folder, checks the files load, and renames them into place, so a
    process that finds the files finds them whole; the others wait on the lock and then load what it left.
    Returns the raw tensors, or None when the download finished without the expected files."""
    from filelock import FileLock

    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f".{name}.lock")):
        if (raw := _load_from(name, cache)) is not None:  # another process finished it while we waited
            return raw
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-download-", dir=cache))
        try:
            _download(name, staging)
            raw = _load_from(name, staging)  # verify before anything becomes visible in the cache
            if raw is None:
                return None
            top = _download_folder(name)
            target = cache / top
            if target.exists():  # a partial folder from an interrupted download of an older version
                shutil.rmtree(target)
            os.replace(staging / top, target)  # atomic on one filesystem
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return raw


def _download_folder(name: str) -> str:
    """The top-level folder torchvision's download creates in its root (the archive next to it is dropped)."""
    import torchvision

    if name in _CIFAR:
        return getattr(torchvision.datasets, _CIFAR[name][0]).base_folder  # cifar-10-batches-py
    return _IDX[name]  # MNIST/, FashionMNIST/ (raw/ inside)


def _expected_files(name: str) -> str:
    if name in _CIFAR:
        import torchvision

        cls = getattr(torchvision.datasets, _CIFAR[name][0])
        files = ", ".join(f for f, _ in cls.train_list + cls.test_list)
        return f"{files} (flat, or in {cls.base_folder}/ as extracted from {cls.filename})"
    return ", ".join(f + "[.gz]" for f in _IDX_FILES) + f" (flat, or in {_IDX[name]}/raw/)"


def _load_raw(name: str, data_dir, download: bool):
    tried = []
    for label, root in _places(name, data_dir):
        tried.append(f"{label} {root}" if root is not None else f"{label} (unset)")
        if root is not None and root.is_dir() and (raw := _load_from(name, root)) is not None:
            return raw
    if os.environ.get("HARNESS_NO_DOWNLOAD", "").strip().lower() in ("1", "true", "yes", "on"):
        download = False
    if not download:
        tried.append("download (disabled)")
    else:
        try:
            raw = _prepare_in_cache(name, cache_dir())
        except Exception as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:240]
            tried.append(f"download into {cache_dir()} (failed: {reason})")
        else:
            if raw is not None:
                return raw
            tried.append(f"download into {cache_dir()} (finished, but the files were not found there)")
    raise DataNotFoundError(
        f"dataset '{name}' not found; tried: {'; '.join(tried)}; to provide it, set data_dir or HARNESS_DATA_DIR "
        f"to a folder containing {_expected_files(name)}"
    )


def locate(name: str, data_dir=None, download: bool = True, timeout_s: float = 3.0) -> Path | None:
    """A study's pre-flight: the folder load_dataset would read `name` from, or None when no place holds it but
    its download host answers (load_dataset will download it). Reads and downloads nothing; raises
    DataNotFoundError (one line: every place tried) when neither. `digits` ships with scikit-learn: None."""
    if name == "digits":
        return None
    if name not in _CIFAR and name not in _IDX:
        raise DataNotFoundError(f"dataset '{name}' is not known; allowed: {', '.join(DATASETS)}")
    tried = []
    for label, root in _places(name, data_dir):
        tried.append(f"{label} {root}" if root is not None else f"{label} (unset)")
        if root is not None and root.is_dir():
            for folder in _candidate_folders(name, root):
                if (_cifar_files(name, folder) if name in _CIFAR else _find_idx(folder)):
                    return folder
    if os.environ.get("HARNESS_NO_DOWNLOAD", "").strip().lower() in ("1", "true", "yes", "on"):
        download = False
    if not download:
        tried.append("download (disabled)")
    else:
        import socket
        import urllib.parse

        import torchvision

        cls = getattr(torchvision.datasets, _CIFAR[name][0] if name in _CIFAR else _IDX[name])
        url = cls.url if name in _CIFAR else cls.mirrors[0]
        host = urllib.parse.urlsplit(url).hostname
        try:  # a TCP handshake with the download host: as far as we can check without downloading
            socket.create_connection((host, 443), timeout=timeout_s).close()
            return None
        except OSError as e:
            tried.append(f"download from {host} (unreachable: {type(e).__name__})")
    raise DataNotFoundError(
        f"dataset '{name}' not found; tried: {'; '.join(tried)}; to provide it, set data_dir or HARNESS_DATA_DIR "
        f"to a folder containing {_expected_files(name)}"
    )


# -----------------------------------------------------------------------------
# the dataset: subset, scale, preprocess, to the device


def _balanced_subset(y: torch.Tensor, size: int, num_classes: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subset with as equal counts per class as the classes allow.

    Each class gets size // K; the remainder goes one each to the lowest-numbered classes. A class with too few
    examples gives all it has and the rest is spread the same way over the others."""
    available = torch.bincount(y, minlength=num_classes).tolist()
    quota = [0] * num_classes
    remaining = size
    while remaining > 0:
        open_classes = [c for c in range(num_classes) if quota[c] < available[c]]
        share = remaining // len(open_classes)
        for rank, c in enumerate(open_classes):
            add = min(share + (1 if share == 0 and rank < remaining else 0), available[c] - quota[c])
            quota[c] += add
        remaining = size - sum(quota)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(_seed("subset", seed)))
    y_in_order = y[order]
    picked = [order[y_in_order == c][: quota[c]] for c in range(num_classes)]
    return torch.cat(picked).sort().values


@dataclass
class RawData:
    """A dataset as read from its files: uint8 (or digits' 0..16 float) images [N, C, H, W] and int64 labels on the
    CPU. Read once per node and shared (a Ray object) so that each trial's processes skip the files and parsers."""
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    max_value: float


def load_raw(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = True) -> RawData:
    """Read dataset `name` (see the module docstring for where from); no subset, no scaling, CPU tensors."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; allowed: {', '.join(DATASETS)}")
    if name == "digits":
        return RawData(name, *_load_digits(), 10, 16.0)
    num_classes = _CIFAR[name][1] if name in _CIFAR else 10
    return RawData(name, *_load_raw(name, data_dir, download), num_classes, 255.0)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
    preprocess: str = "paper",
    device: str | torch.device = "cpu",
    download: bool = True,
    invert: bool = False,
    raw: RawData | None = None,
) -> Dataset:
    """The dataset as float32 tensors on `device`, preprocessed with statistics of the (sub)training set.

    train_size: a class-balanced subset of the training set, chosen by `seed` (the test set is always whole).
    val_size: a class-balanced validation split held out of the training set before `train_size` is drawn; it is
    the same for every seed (AlgoPerf's rule: tuning selects on validation, the report scores the test set).
    preprocess: "paper" subtracts the per-pixel mean image (Caffe's mean_file) and mirrors; "mean" only subtracts it
    (a Caffe data layer with a mean_file and no mirror: cifar10_full's); "standard" standardizes
    each channel and crops (pad 4) + mirrors; "pixel_standard" standardizes each pixel with the training set's
    per-pixel mean and std (no augmentation); "none" only scales to [0, 1]. Pixels are scaled to [0, 1] first.
    invert: every pixel x becomes 1 - x after that scaling, before preprocessing ("negative" images). The statistics
    are those of the images as inverted, so "pixel_standard" (like "mean") undoes the inversion's shift of each
    pixel: an inverted image standardized is exactly the plain image standardized, negated.
    raw: the files' content read earlier by `load_raw` (the same `name`); then no file is read here.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset '{name}'; allowed: {', '.join(DATASETS)}")
    if preprocess not in PREPROCESS:
        raise ValueError(f"unknown preprocess '{preprocess}'; allowed: {', '.join(PREPROCESS)}")
    raw = _raw_of(name, raw, data_dir, download)
    train_x, train_y, val_x, val_y = _hold_out_validation(name, raw.train_x, raw.train_y, val_size, raw.num_classes)
    train_x, train_y = _training_subset(name, train_x, train_y, train_size, raw.num_classes, seed)
    train_x, test_x, val_x = _scaled_on_device(train_x, raw.test_x, val_x, raw.max_value, device, invert)
    train_y, test_y = train_y.to(device), raw.test_y.to(device)
    val_y = None if val_y is None else val_y.to(device)
    train_x, test_x, val_x, augment = _preprocessed(train_x, test_x, val_x, preprocess)
    return Dataset(name, train_x.contiguous(), train_y, test_x.contiguous(), test_y, raw.num_classes, augment,
                   None if val_x is None else val_x.contiguous(), val_y)


def _raw_of(name: str, raw: RawData | None, data_dir, download: bool) -> RawData:
    """The files' content: `raw` when given (it must be `name`'s), else read now."""
    if raw is None:
        return load_raw(name, data_dir=data_dir, download=download)
    if raw.name != name:
        raise ValueError(f"raw data of '{raw.name}' given for dataset '{name}'")
    return raw


def _hold_out_validation(name: str, x: torch.Tensor, y: torch.Tensor, val_size: int | None, num_classes: int):
    """(train_x, train_y, val_x, val_y): a class-balanced split of `val_size` held out of the training set, the same
    for every seed; val_x and val_y are None without a val_size."""
    if not val_size:
        return x, y, None, None
    if not 0 < val_size < len(y):
        raise ValueError(f"val_size={val_size} for '{name}' must be between 1 and {len(y) - 1}")
    held = torch.zeros(len(y), dtype=torch.bool)
    held[_balanced_subset(y, val_size, num_classes, seed=-1)] = True  # one split for every seed
    return x[~held], y[~held], x[held], y[held]


def _training_subset(name: str, x: torch.Tensor, y: torch.Tensor, train_size: int | None, num_classes: int,
                     seed: int):
    """(x, y) cut to a class-balanced subset of `train_size` chosen by `seed`; the whole set without a train_size."""
    if train_size is None:
        return x, y
    if not 0 < train_size <= len(y):
        raise ValueError(f"train_size={train_size} for '{name}' must be between 1 and {len(y)} "
                         f"(the size of its training set)")
    if train_size < len(y):
        keep = _balanced_subset(y, train_size, num_classes, seed)
        x, y = x[keep], y[keep]
    return x, y


def _scaled_on_device(train_x: torch.Tensor, test_x: torch.Tensor, val_x: torch.Tensor | None, max_value: float,
                      device: str | torch.device, invert: bool):
    """The images to the device as they are (uint8: 4x less to copy), then scaled there to [0, 1] and, with
    `invert`, turned into 1 - x."""
    train_x = train_x.to(device).float().div(max_value)  # out of place: raw may be shared
    test_x = test_x.to(device).float().div(max_value)
    if val_x is not None:
        val_x = val_x.to(device).float().div_(max_value)  # in place: a copy made by the split
    if invert:
        train_x, test_x = 1.0 - train_x, 1.0 - test_x
        val_x = None if val_x is None else 1.0 - val_x
    return train_x, test_x, val_x


def _preprocessed(train_x: torch.Tensor, test_x: torch.Tensor, val_x: torch.Tensor | None, preprocess: str):
    """(train_x, test_x, val_x, augment): normalized with the training set's statistics ("paper": minus the mean
    image; "standard": per-channel standardization; "pixel_standard": per-pixel standardization; "none":
    unchanged) and the augmentation that goes with it."""
    if preprocess in ("paper", "mean"):
        mean = train_x.mean(dim=0, keepdim=True)  # the mean image [1, C, H, W]
        train_x, test_x = train_x - mean, test_x - mean
        val_x = None if val_x is None else val_x - mean
        augment = "paper" if preprocess == "paper" else "none"
    elif preprocess == "standard":
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
        val_x = None if val_x is None else (val_x - mean) / std
        augment = "standard"
    elif preprocess == "pixel_standard":
        mean = train_x.mean(dim=0, keepdim=True)  # the mean image [1, C, H, W], and the std of each pixel
        std = train_x.std(dim=0, keepdim=True)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))  # a pixel constant in training (MNIST's border)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std  # is only centred (sklearn's StandardScaler)
        val_x = None if val_x is None else (val_x - mean) / std
        augment = "none"
    else:
        augment = "none"
    return train_x, test_x, val_x, augment


# -----------------------------------------------------------------------------
# batches


def augment_batch(x: torch.Tensor, augment: str, seed: int, step: int, start: int = 0, global_size: int | None = None):
    """Augment rows [start, start + len(x)) of global batch `step` (of `global_size` rows, default len(x)).

    The random draws are made for the whole global batch from a CPU generator keyed by (seed, step) and then
    sliced, so every shard gets exactly the augmentation it would get inside the unsharded batch, on any device.
    """
    if augment == "none":
        return x
    n, (c, h, w) = global_size or len(x), x.shape[1:]
    g = torch.Generator().manual_seed(_seed("augment", seed, step))
    flip = torch.rand(n, generator=g) < 0.5
    offsets = torch.randint(0, 9, (2, n), generator=g)  # pad 4: crop offset 0..8 in each direction
    rows = slice(start, start + len(x))
    flip = flip[rows].to(x.device)
    if augment == "paper":
        return torch.where(flip[:, None, None, None], x.flip(3), x)
    if augment != "standard":
        raise ValueError(f"unknown augment '{augment}'; allowed: paper, standard, none")
    # pad 4 with zeros (the mean, after standardization), then one gather takes each image's crop, mirrored or not
    dy, dx = offsets[:, rows].to(x.device)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    cols = dx[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # [b, w]
    ys = (dy[:, None] + ar_h)[:, None, :, None]  # [b, 1, h, 1]
    b = torch.arange(len(x), device=x.device)[:, None, None, None]
    ch = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[b, ch, ys, cols[:, None, None, :]]


class TrainBatches:
    """Global batch `step` = rows [i*B, (i+1)*B) of epoch (step // steps_per_epoch)'s permutation, i = step % spe;
    rank r gets its contiguous slice [r*B/W, (r+1)*B/W). `batch_size` is the global batch B. No state but a cache."""

    def __init__(self, ds: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        n = len(ds.train_y)
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the training set of '{ds.name}' ({n})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, {world_size})")
        self.ds, self.batch_size, self.rank, self.world_size, self.seed = ds, batch_size, rank, world_size, seed
        self.steps_per_epoch = n // batch_size  # the last incomplete batch is dropped
        self.local_batch_size = batch_size // world_size
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of the training set in `epoch`, the same on every rank (cached for the current epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_seed("epoch", self.seed, epoch))
            self._perm = torch.randperm(len(self.ds.train_y), generator=g).to(self.ds.train_y.device)
            self._epoch = epoch
        return self._perm

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of global batch number `step` (0-based), augmented."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.batch_size + self.rank * self.local_batch_size
        idx = self.permutation(epoch)[start : start + self.local_batch_size]
        x = augment_batch(self.ds.train_x[idx], self.ds.augment, self.seed, step,
                          start=self.rank * self.local_batch_size, global_size=self.batch_size)
        return x, self.ds.train_y[idx]


def test_batches(ds: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, split: str = "test"):
    """Yield (x, y) over this rank's disjoint contiguous shard of the full test set (`split="val"`: the validation
    split) (shards of all ranks cover it exactly once), no augmentation. `batch_size` is the number of images per
    yielded batch on this rank; shards
    differ by at most one image, and the last batch of a shard may be smaller."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    xs, ys = (ds.val_x, ds.val_y) if split == "val" else (ds.test_x, ds.test_y)
    n = len(ys)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    for s in range(lo, hi, batch_size):
        e = min(s + batch_size, hi)
        yield xs[s:e], ys[s:e]


test_batches.__test__ = False  # not a pytest test, despite the name
