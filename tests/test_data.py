"""harness.trial.data: loaders (digits, CIFAR and MNIST formats, lookup order, offline error), preprocessing,
augmentation, and the sharding/resume semantics of TrainBatches and test_batches."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from harness.trial import data

try:
    from tests.dataset_files import write_cifar10, write_cifar100, write_mnist
    from tests.paper_material import FIXTURES, MNIST_TEST, MNIST_TRAIN, mnist_dir
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from dataset_files import write_cifar10, write_cifar100, write_mnist
    from paper_material import FIXTURES, MNIST_TEST, MNIST_TRAIN, mnist_dir

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user's data dir, cache or Debian files leak in; no test can reach the network."""
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(data, "DEBIAN_DATA_ROOT", tmp_path / "debian")

    def no_network(name, root):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(data, "_download", no_network)


@pytest.fixture(scope="module")
def digits():
    return data.load_dataset("digits", preprocess="none")


# --------------------------------------------------------------------------- digits, subsets


def test_digits_shapes_and_fixed_split(digits):
    assert (digits.name, digits.num_classes, digits.in_channels, digits.image_size) == ("digits", 10, 1, 8)
    assert digits.train_x.shape == (1437, 1, 8, 8) and digits.test_x.shape == (360, 1, 8, 8)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    assert digits.train_x.min() == 0 and digits.train_x.max() == 1  # 0..16 scaled by 1/16
    assert digits.augment == "none"
    counts = torch.bincount(digits.test_y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    other_seed = data.load_dataset("digits", preprocess="none", seed=5)  # the split ignores the trial seed
    assert torch.equal(other_seed.test_x, digits.test_x) and torch.equal(other_seed.train_y, digits.train_y)


def test_train_size_is_class_balanced_and_seeded(digits):
    a = data.load_dataset("digits", train_size=200, seed=1, preprocess="none")
    assert torch.bincount(a.train_y, minlength=10).tolist() == [20] * 10
    assert a.test_x.shape[0] == 360  # the test set is always whole
    again = data.load_dataset("digits", train_size=200, seed=1, preprocess="none")
    assert torch.equal(a.train_x, again.train_x) and torch.equal(a.train_y, again.train_y)
    b = data.load_dataset("digits", train_size=200, seed=2, preprocess="none")
    assert not torch.equal(a.train_x, b.train_x)
    # every chosen image is a training image
    rows = {tuple(r.tolist()) for r in digits.train_x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in a.train_x.flatten(1))
    c = data.load_dataset("digits", train_size=205, seed=1, preprocess="none")
    assert torch.bincount(c.train_y, minlength=10).tolist() == [21] * 5 + [20] * 5  # remainder to the first classes


def test_train_size_limits():
    with pytest.raises(ValueError, match="train_size=1438.*1437"):
        data.load_dataset("digits", train_size=1438)
    full = data.load_dataset("digits", train_size=1437, preprocess="none")
    assert full.train_x.shape[0] == 1437
    # a class too small for an equal share gives what it has; the others make up the rest
    y = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    idx = data._balanced_subset(y, 15, 3, seed=0)
    assert len(idx) == 15 and len(set(idx.tolist())) == 15
    assert torch.bincount(y[idx]).tolist() == [2, 7, 6]


def test_unknown_names_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; allowed: cifar10"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="unknown preprocess"):
        data.load_dataset("digits", preprocess="zca")


# --------------------------------------------------------------------------- file formats


def test_cifar10_files_in_torchvision_layout_and_flat(tmp_path):
    x, y = write_cifar10(tmp_path / "tv" / "cifar-10-batches-py")
    ds = data.load_dataset("cifar10", data_dir=tmp_path / "tv", preprocess="none", download=False)
    assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    assert ds.train_y.tolist() == y[:100] and ds.test_y.tolist() == y[100:]
    # rows are R, G, B planes of 32x32, as in the original files
    assert torch.equal((ds.train_x * 255).round().to(torch.uint8), torch.from_numpy(x[:100]).view(-1, 3, 32, 32))
    assert torch.equal((ds.test_x[3, 1] * 255).round().to(torch.uint8),
                       torch.from_numpy(x[103, 1024:2048]).view(32, 32))

    shutil.copytree(tmp_path / "tv" / "cifar-10-batches-py", tmp_path / "flat")
    flat = data.load_dataset("cifar10", data_dir=tmp_path / "flat", preprocess="none", download=False)
    assert torch.equal(flat.train_x, ds.train_x) and torch.equal(flat.test_y, ds.test_y)


def test_torchvision_class_rejects_the_fixture_by_md5(tmp_path):
    """Why the loader reads the batch files itself: torchvision's CIFAR10 demands the md5 of the real files."""
    import torchvision

    write_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        torchvision.datasets.CIFAR10(str(tmp_path), train=True, download=False)


def test_cifar100_format(tmp_path):
    write_cifar100(tmp_path / "cifar100" / "cifar-100-python")  # <root>/<name>/<torchvision layout>
    ds = data.load_dataset("cifar100", data_dir=tmp_path, preprocess="none", download=False)
    assert ds.num_classes == 100
    assert ds.train_x.shape == (200, 3, 32, 32) and ds.test_x.shape == (100, 3, 32, 32)
    assert ds.train_y.tolist() == [i % 100 for i in range(200)]  # fine labels, not coarse


def test_cifar_pickle_may_not_reference_arbitrary_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)

    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="shutil"):
        data.load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert (tmp_path / "victim").is_dir()


def test_mnist_from_a_flat_folder_of_the_original_files():
    """../shared/data/mnist (all of MNIST) when it is there, else the first 200 + 50 images committed in
    tests/fixtures/mnist: the original IDX files, gzipped, in one flat folder."""
    folder = mnist_dir()
    n_train, n_test = (60000, 10000) if folder != FIXTURES / "mnist" else (MNIST_TRAIN, MNIST_TEST)
    ds = data.load_dataset("mnist", data_dir=folder, train_size=50, preprocess="none", download=False)
    assert ds.train_x.shape == (50, 1, 28, 28) and ds.test_x.shape == (n_test, 1, 28, 28)
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    assert torch.bincount(ds.train_y).tolist() == [5] * 10
    assert ds.test_y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first MNIST test labels
    assert ds.test_x.min() == 0 and ds.test_x.max() == 1
    assert data._read_idx(folder / "train-labels-idx1-ubyte.gz").shape == (n_train,)


def test_fashion_mnist_from_debian(monkeypatch):
    if not DEBIAN_FASHION.is_dir():  # .ci/run installs it; there (HARNESS_REQUIRE_SHARED=1) its absence fails
        if os.environ.get("HARNESS_REQUIRE_SHARED") == "1":
            pytest.fail(f"{DEBIAN_FASHION} absent (apt-get install dataset-fashion-mnist)")
        pytest.skip(f"{DEBIAN_FASHION} absent (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(data, "DEBIAN_DATA_ROOT", DEBIAN_FASHION.parent)
    ds = data.load_dataset("fashion_mnist", train_size=500, preprocess="none", download=False)
    assert ds.train_x.shape == (500, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.test_y[:3].tolist() == [9, 2, 1]  # ankle boot, pullover, trouser
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10


def test_lookup_order_data_dir_env_cache_debian(tmp_path, monkeypatch):
    write_mnist(tmp_path / "arg", n_train=30)  # flat, gzipped
    write_mnist(tmp_path / "env" / "MNIST" / "raw", n_train=40, gz=False)  # torchvision's layout
    write_mnist(tmp_path / "xdg" / "harness" / "data" / "mnist", n_train=50)  # <cache>/<name>/ flat
    write_mnist(tmp_path / "debian" / "mnist", n_train=60)
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "env"))

    def n_train(**kw):
        return data.load_dataset("mnist", preprocess="none", download=False, **kw).train_x.shape[0]

    assert n_train(data_dir=tmp_path / "arg") == 30
    assert n_train() == 40
    assert n_train(data_dir=tmp_path / "nothing-here") == 40  # an empty data_dir falls through
    monkeypatch.delenv("HARNESS_DATA_DIR")
    assert n_train() == 50
    shutil.rmtree(tmp_path / "xdg")
    assert n_train() == 60
    # Debian's folder name uses a dash: /usr/share/datasets/fashion-mnist
    write_mnist(tmp_path / "debian" / "fashion-mnist", n_train=70)
    assert data.load_dataset("fashion_mnist", download=False).train_x.shape[0] == 70


def test_offline_error_names_every_place(tmp_path, monkeypatch):
    (tmp_path / "empty_arg").mkdir()
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "empty_env"))
    with pytest.raises(data.DataNotFoundError) as err:
        data.load_dataset("mnist", data_dir=tmp_path / "empty_arg", download=False)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "\n" not in msg and msg.startswith("dataset 'mnist' not found")
    for place in (tmp_path / "empty_arg", tmp_path / "empty_env", tmp_path / "xdg" / "harness" / "data",
                  tmp_path / "debian" / "mnist", "download (disabled)"):
        assert str(place) in msg
    assert "set data_dir or HARNESS_DATA_DIR" in msg and "train-images-idx3-ubyte" in msg


def test_download_is_tried_last_and_its_failure_reported(tmp_path, monkeypatch):
    calls = []

    def failing(name, root):
        calls.append((name, root))
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nTried https://x, got:\n<urlopen error>")

    monkeypatch.setattr(data, "_download", failing)
    with pytest.raises(data.DataNotFoundError) as err:
        data.load_dataset("cifar10")
    msg = str(err.value)
    assert [(n, root.parent) for n, root in calls] == [("cifar10", tmp_path / "xdg" / "harness" / "data")]
    assert not list(calls[0][1].parent.glob(".cifar10-download-*"))  # the failed download left nothing behind
    assert "\n" not in msg and "failed: RuntimeError: Error downloading" in msg and "HARNESS_DATA_DIR (unset)" in msg
    assert "cifar-10-batches-py" in msg

    calls.clear()
    monkeypatch.setenv("HARNESS_NO_DOWNLOAD", "1")
    with pytest.raises(data.DataNotFoundError, match="download \\(disabled\\)"):
        data.load_dataset("cifar10")
    assert calls == []


def test_download_lands_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda name, root: write_mnist(root / "MNIST" / "raw", 20, gz=False))
    assert data.load_dataset("mnist").train_x.shape[0] == 20


def test_corrupt_file_is_an_error_not_a_fallthrough(tmp_path):
    write_mnist(tmp_path, n_train=20)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(ValueError, match="has 3 values"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)


# --------------------------------------------------------------------------- preprocessing, augmentation


def test_paper_preprocess_subtracts_the_mean_image(digits):
    ds = data.load_dataset("digits", preprocess="paper")
    assert ds.augment == "paper"
    assert ds.train_x.mean(0).abs().max() < 1e-6
    mean_image = digits.train_x.mean(0)
    assert torch.allclose(ds.test_x, digits.test_x - mean_image, atol=1e-6)  # the training mean, on test too
    assert mean_image.std() > 0.1  # per pixel, not one scalar


def test_standard_preprocess_standardizes_each_channel(tmp_path):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    ds = data.load_dataset("cifar10", data_dir=tmp_path, preprocess="standard", download=False)
    assert ds.augment == "standard"
    assert ds.train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (ds.train_x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-5


def test_paper_augmentation_mirrors_half_and_is_seeded():
    x = torch.randn(64, 3, 8, 8)
    out = data.augment_batch(x, "paper", seed=0, step=3)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 10 < int(mirrored.sum()) < 54
    assert torch.equal(out, data.augment_batch(x, "paper", seed=0, step=3))
    assert not torch.equal(out, data.augment_batch(x, "paper", seed=0, step=4))
    assert not torch.equal(out, data.augment_batch(x, "paper", seed=1, step=3))
    assert data.augment_batch(x, "none", seed=0, step=3) is x


def test_standard_augmentation_is_a_padded_crop_maybe_mirrored():
    x = torch.randn(32, 2, 8, 8)
    out = data.augment_batch(x, "standard", seed=0, step=0)
    assert out.shape == x.shape and not torch.equal(out, x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    kinds = set()
    for i in range(len(x)):
        crops = {(dy, dx): padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(9) for dx in range(9)}
        matches = [(dy, dx, f) for (dy, dx), c in crops.items() for f in (False, True)
                   if torch.equal(out[i], c.flip(2) if f else c)]
        assert matches, f"image {i} is no crop of the padded input"
        kinds.add(matches[0])
    assert len(kinds) > 10  # offsets and flips vary


# --------------------------------------------------------------------------- TrainBatches, test_batches


def index_dataset(n: int, augment: str = "none") -> data.Dataset:
    """A dataset whose example i has label i and an image filled with i (with a corner mark, so mirrors show)."""
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 4, 4).contiguous()
    x[:, :, 0, 0] += 0.5
    return data.Dataset("index", x, torch.arange(n), x[:10].clone(), torch.arange(10), n, augment)


def ids(x: torch.Tensor) -> list[int]:
    return x[:, 0, 1, 1].long().tolist()


def test_an_epoch_is_a_permutation_and_epochs_differ():
    ds = index_dataset(103)
    tb = data.TrainBatches(ds, 10, seed=4)
    assert tb.steps_per_epoch == 10  # the last 3 are dropped
    epoch0 = [i for s in range(10) for i in tb.get(s)[1].tolist()]
    epoch1 = [i for s in range(10, 20) for i in tb.get(s)[1].tolist()]
    assert len(set(epoch0)) == 100 and len(set(epoch1)) == 100
    assert epoch0 != epoch1
    x, y = tb.get(0)
    assert ids(x) == y.tolist()  # labels travel with their images
    assert epoch0 != [i for s in range(10) for i in data.TrainBatches(ds, 10, seed=5).get(s)[1].tolist()]


@pytest.mark.parametrize("augment", ["none", "paper", "standard"])
def test_shards_are_disjoint_and_concatenate_to_the_single_worker_batch(augment):
    ds = index_dataset(200, augment)
    single = data.TrainBatches(ds, 40, seed=1)
    for world in (2, 4, 8):
        ranks = [data.TrainBatches(ds, 40, rank=r, world_size=world, seed=1) for r in range(world)]
        for step in (0, 3, 5, 11):  # 5 steps per epoch: 5 and 11 are in later epochs
            shards = [tb.get(step) for tb in ranks]
            assert all(len(x) == 40 // world for x, _ in shards)
            shard_ids = [set(y.tolist()) for _, y in shards]
            assert sum(len(s) for s in shard_ids) == len(set().union(*shard_ids)) == 40
            x1, y1 = single.get(step)
            assert torch.equal(torch.cat([x for x, _ in shards]), x1)
            assert torch.equal(torch.cat([y for _, y in shards]), y1)
    if augment != "none":
        x, y = single.get(0)
        assert not torch.equal(x, ds.train_x[y])  # augmentation did something


def test_get_is_stateless_for_resume():
    ds = index_dataset(100, "standard")
    walked = data.TrainBatches(ds, 20, seed=2)
    seen = [walked.get(s) for s in range(12)]
    resumed = data.TrainBatches(ds, 20, seed=2)
    for s in (11, 7, 7, 0, 11):
        x, y = resumed.get(s)
        assert torch.equal(x, seen[s][0]) and torch.equal(y, seen[s][1])


def test_train_batches_rejects_bad_sizes():
    ds = index_dataset(50)
    with pytest.raises(ValueError, match="multiple of world_size"):
        data.TrainBatches(ds, 10, world_size=3)
    with pytest.raises(ValueError, match="larger than the training set"):
        data.TrainBatches(ds, 60)
    with pytest.raises(ValueError, match="rank"):
        data.TrainBatches(ds, 10, rank=2, world_size=2)


@pytest.mark.parametrize("world", [1, 3, 7])
def test_test_batches_cover_the_test_set_once(digits, world):
    parts = [batch for r in range(world) for batch in data.test_batches(digits, 16, rank=r, world_size=world)]
    assert all(len(x) <= 16 for x, _ in parts)
    assert torch.equal(torch.cat([x for x, _ in parts]), digits.test_x)
    assert torch.equal(torch.cat([y for _, y in parts]), digits.test_y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batches_match_cpu_bit_for_bit():
    cpu = data.load_dataset("digits", preprocess="standard")
    gpu = data.load_dataset("digits", preprocess="standard", device="cuda")
    assert gpu.train_x.is_cuda and torch.allclose(gpu.train_x.cpu(), cpu.train_x, atol=1e-5)
    gpu.train_x = cpu.train_x.cuda()  # same inputs, so any difference comes from the batching
    a, b = data.TrainBatches(cpu, 64, rank=1, world_size=2), data.TrainBatches(gpu, 64, rank=1, world_size=2)
    for step in (0, 30):
        (xa, ya), (xb, yb) = a.get(step), b.get(step)
        assert xb.is_cuda and torch.equal(xb.cpu(), xa) and torch.equal(yb.cpu(), ya)


# --------------------------------------------------------------------------- one download per node


def _prepare_with_fake_download(cache: str, counter: str, per_batch: int) -> tuple:
    """One of the concurrent processes: the real load_dataset, with torchvision's download replaced by a fake
    that writes the CIFAR-10 python format slowly (widening the race) and counts its calls."""
    import os
    import time

    os.environ["XDG_CACHE_HOME"] = cache

    def fake_download(name, root):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        write_cifar10(Path(root) / "cifar-10-batches-py", per_batch=per_batch)
        time.sleep(1.0)

    data._download = fake_download
    ds = data.load_dataset("cifar10", preprocess="none")
    return tuple(ds.train_x.shape), (ds.train_x * 255).round().to(torch.uint8).flatten().tolist()[:64], \
        ds.train_y.tolist()


@pytest.mark.slow
def test_concurrent_preparation_downloads_once_and_every_process_loads_it(tmp_path):
    import multiprocessing

    cache, counter = tmp_path / "shared_cache", tmp_path / "downloads.txt"
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, as four trials on one node are
    with ctx.Pool(4) as pool:
        results = pool.starmap(_prepare_with_fake_download, [(str(cache), str(counter), 20)] * 4)
    assert len(counter.read_text().splitlines()) == 1  # one download for four processes
    expected_x, expected_y = write_cifar10(tmp_path / "expected", per_batch=20)
    train_x = torch.from_numpy(expected_x[:100].reshape(-1, 3, 32, 32))
    for shape, first_pixels, labels in results:
        assert shape == (100, 3, 32, 32)
        assert first_pixels == train_x.flatten().tolist()[:64]
        assert labels == expected_y[:100]
    root = cache / "harness" / "data"
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == ["cifar-10-batches-py"]


def test_mean_preprocess_subtracts_the_mean_image_and_does_not_mirror():
    """CLR1's cifar10_full data layer: a mean_file and no mirror (`preprocess: mean`), unlike `paper`."""
    raw = data.load_dataset("digits", preprocess="none")
    mean_only = data.load_dataset("digits", preprocess="mean")
    paper = data.load_dataset("digits", preprocess="paper")
    assert mean_only.augment == "none" and paper.augment == "paper"
    expected = raw.train_x - raw.train_x.mean(dim=0, keepdim=True)
    assert torch.allclose(mean_only.train_x, expected) and torch.allclose(paper.train_x, expected)
    assert torch.allclose(mean_only.test_x, raw.test_x - raw.train_x.mean(dim=0, keepdim=True))
