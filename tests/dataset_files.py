"""Small datasets in their real file formats, for tests (and, run as a script, a full-size fake CIFAR-10/100).

    write_cifar10(folder, per_batch)     data_batch_1..5 + test_batch: CIFAR-10's python pickles
    write_cifar100(folder, n_train, n_test)   train + test: CIFAR-100's python pickles
    write_mnist(folder, n_train)         MNIST's IDX files (gzipped or not)

The loaders (harness.trial.data) read these exactly as they read the real files; the pixels are random and the
labels cycle through the classes, so a model trained on them learns nothing: for paths, shapes and timing only.

    python tests/dataset_files.py DIR    # DIR/cifar-10-batches-py and DIR/cifar-100-python at the real sizes
                                         # (50,000 + 10,000 images each); then HARNESS_DATA_DIR=DIR
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as in MNIST (uint8), gzipped if the name ends in .gz."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(payload)


def write_mnist(folder: Path, n_train: int, n_test: int = 10, fill: int = 7, gz: bool = True) -> None:
    """A tiny MNIST-format set: every pixel `fill`, labels 0..9 repeating."""
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", np.full((n, 28, 28), fill))
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", np.arange(n) % 10)


def cifar_arrays(n: int, num_classes: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), [i % num_classes for i in range(n)]


def write_cifar10(folder: Path, per_batch: int = 20) -> tuple[np.ndarray, list]:
    """The CIFAR-10 python format: pickled dicts with b"data" uint8 [n, 3072] (R, G, B planes) and b"labels"."""
    folder.mkdir(parents=True, exist_ok=True)
    all_x, all_y = [], []
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):
        x, y = cifar_arrays(per_batch, 10, seed=i)
        entry = {b"batch_label": name.encode(), b"labels": y, b"data": x, b"filenames": [b"f.png"] * per_batch}
        # protocol 2 and numpy's old module path, as in the real files (pickled by Python 2 with numpy 1.x)
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2).replace(b"numpy._core.", b"numpy.core."))
        all_x.append(x)
        all_y += y
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}))
    return np.concatenate(all_x), all_y


def write_cifar100(folder: Path, n_train: int = 200, n_test: int = 100) -> None:
    """The CIFAR-100 python format (str keys here, as torchvision sees the Python 2 pickles with latin1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for seed, (name, n) in enumerate((("train", n_train), ("test", n_test))):
        x, y = cifar_arrays(n, 100, seed)
        entry = {"data": x, "fine_labels": y, "coarse_labels": [v // 5 for v in y]}
        (folder / name).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python tests/dataset_files.py DIR (writes a full-size fake CIFAR-10 and CIFAR-100 there)",
              file=sys.stderr)
        return 2
    root = Path(args[0])
    write_cifar10(root / "cifar-10-batches-py", per_batch=10_000)
    write_cifar100(root / "cifar-100-python", n_train=50_000, n_test=10_000)
    print(f"wrote {root}/cifar-10-batches-py and {root}/cifar-100-python; use HARNESS_DATA_DIR={root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
