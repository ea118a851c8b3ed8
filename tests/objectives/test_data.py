import subprocess
import sys
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from sklearn.datasets import load_digits

from objectives.data import DataSplits, batch_indices, clear_data_cache, digits_cache_file, load_data
from objectives.errors import DatasetNotFoundError
from objectives.settings import TrainConfig

CPU = torch.device("cpu")


def _raw(data: DataSplits, x: torch.Tensor) -> torch.Tensor:
    """Normalise the stored pixels as training does, then undo it: the round trip must give the pixels back."""
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    return data.inputs(x) * std + mean


def test_digits_splits_partition_the_data_set() -> None:
    data = load_data(TrainConfig(dataset="digits", test_size=0.2, val_size=0.1), CPU)
    assert data.name == "digits" and data.num_classes == 10
    assert (data.in_channels, data.image_size, data.flip_ok) == (1, 8, False)
    n_train, n_val, n_test = len(data.train_y), len(data.val_y), len(data.test_y)
    assert (n_train + n_val + n_test, n_test, n_val) == (1797, 360, 144)
    assert data.train_x.shape == (n_train, 1, 8, 8) and data.train_x.dtype == torch.uint8  # stored as pixels
    assert data.train_y.dtype == torch.int64

    # Every original image lands in exactly one split (a multiset comparison, as digits has duplicates).
    pixels = torch.cat([_raw(data, x) for x in (data.train_x, data.val_x, data.test_x)]).round()
    labels = torch.cat([data.train_y, data.val_y, data.test_y])
    ours = Counter((tuple(p.flatten().int().tolist()), int(y)) for p, y in zip(pixels, labels, strict=True))
    bunch = load_digits()
    theirs = Counter((tuple(p.astype(int).flatten()), int(y)) for p, y in zip(bunch.images, bunch.target, strict=True))
    assert ours == theirs

    # Stratified: every class is in every split.
    for y in (data.train_y, data.val_y, data.test_y):
        assert set(y.tolist()) == set(range(10))


def _splits(data: DataSplits) -> list[torch.Tensor]:
    return [data.train_x, data.train_y, data.val_x, data.val_y, data.test_x, data.test_y]


def test_digits_split_is_kept_in_the_cache_folder_and_read_back_without_scikit_learn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_CACHE_DIR", str(tmp_path))
    cfg = TrainConfig(dataset="digits", test_size=0.2, val_size=0.1, data_seed=3)
    clear_data_cache()
    first = load_data(cfg, CPU)  # split by scikit-learn, then written
    path = digits_cache_file(cfg)
    assert path is not None and path.parent == tmp_path / "digits" and path.is_file()
    assert digits_cache_file(TrainConfig(dataset="digits", data_seed=4)) != path  # another split, another file
    script = ("import sys, torch; from objectives.data import load_data; from objectives.settings import TrainConfig\n"
              "cfg = TrainConfig(dataset='digits', test_size=0.2, val_size=0.1, data_seed=3)\n"
              "d = load_data(cfg, torch.device('cpu'))\n"
              "assert 'sklearn' not in sys.modules, 'imported scikit-learn'\n"
              "torch.save([d.train_x, d.train_y, d.val_x, d.val_y, d.test_x, d.test_y], sys.argv[1])")
    env = {"HPO_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "read.pt")], cwd=Path(__file__).parents[2], env=env,
                   check=True)
    read = torch.load(tmp_path / "read.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(_splits(first), read, strict=True))
    assert first.mean == load_data(cfg, CPU).mean  # the same normalisation from the same training split


def test_a_damaged_digits_cache_file_is_split_again_and_rewritten(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HPO_CACHE_DIR", str(tmp_path))
    cfg = TrainConfig(dataset="digits", data_seed=5)
    clear_data_cache()
    good = _splits(load_data(cfg, CPU))
    path = digits_cache_file(cfg)
    assert path is not None
    whole = path.read_bytes()
    for damaged in (whole[: len(whole) // 2], b"not a checkpoint"):
        path.write_bytes(damaged)
        clear_data_cache()
        assert all(torch.equal(a, b) for a, b in zip(good, _splits(load_data(cfg, CPU)), strict=True))
        assert path.read_bytes() != damaged and torch.load(path, weights_only=True)["splits"][0].shape == good[0].shape
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_training_split_is_normalised_per_channel() -> None:
    data = load_data(TrainConfig(dataset="synthetic", synthetic_train=400, synthetic_val=50, synthetic_test=50), CPU)
    inputs = data.inputs(data.train_x)
    assert inputs.dtype == torch.float32 and data.train_x.dtype == torch.float32  # synthetic data is float
    mean = inputs.mean(dim=(0, 2, 3))
    std = inputs.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(std, torch.ones(3), atol=1e-4)
    assert len(data.mean) == len(data.std) == 3


def test_val_size_as_count_and_train_subset() -> None:
    data = load_data(TrainConfig(val_size=100, train_subset=200), CPU)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (200, 100, 360)


def test_val_size_too_large_is_explained() -> None:
    with pytest.raises(ValueError, match="leaves no training examples"):
        load_data(TrainConfig(val_size=5000), CPU)


def test_synthetic_is_seeded_and_learnable() -> None:
    cfg = TrainConfig(
        dataset="synthetic",
        synthetic_shape=(2, 16, 16),
        synthetic_classes=4,
        synthetic_train=400,
        synthetic_val=100,
        synthetic_test=60,
    )
    data = load_data(cfg, CPU)
    assert data.train_x.shape == (400, 2, 16, 16) and data.val_x.shape == (100, 2, 16, 16)
    assert len(data.test_y) == 60 and data.num_classes == 4 and data.flip_ok
    assert set(data.train_y.tolist()) == {0, 1, 2, 3}

    again = load_data(cfg.model_copy(update={"train_subset": 400}), CPU)  # different key, same seed
    assert torch.equal(again.val_x, data.val_x)
    other = load_data(cfg.model_copy(update={"data_seed": 1}), CPU)
    assert not torch.equal(other.val_x, data.val_x)

    # Nearest class mean already separates the classes, so a CNN can learn them.
    means = torch.stack([data.train_x[data.train_y == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(data.val_x.flatten(1), means).argmin(1)
    assert (pred == data.val_y).float().mean() > 0.9


def test_cache_returns_the_same_object_per_key() -> None:
    cfg = TrainConfig(train_subset=300)
    first = load_data(cfg, CPU)
    assert load_data(TrainConfig(train_subset=300, lr=0.5, seed=3), CPU) is first  # training fields don't matter
    assert load_data(TrainConfig(train_subset=301), CPU) is not first


def test_batch_indices_cover_every_example_once() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = batch_indices(10, 4, gen, CPU)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    again = batch_indices(10, 4, torch.Generator().manual_seed(0), CPU)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_format_read_through_torchvision(tmp_path: Path, make_mnist, dataset: str, folder: str) -> None:
    written = make_mnist(tmp_path, folder=folder, n_train=50, n_test=20)
    cfg = TrainConfig(dataset=dataset, data_dir=str(tmp_path), download=False, val_size=10)
    data = load_data(cfg, CPU)
    assert data.train_x.shape == (40, 1, 28, 28) and data.val_x.shape == (10, 1, 28, 28)
    assert data.test_x.shape == (20, 1, 28, 28)
    assert (data.num_classes, data.in_channels, data.image_size, data.flip_ok) == (10, 1, 28, False)
    assert data.test_y.tolist() == written["test_y"].tolist()  # test split keeps the file order
    assert sorted(torch.cat([data.train_y, data.val_y]).tolist()) == sorted(written["train_y"].tolist())
    assert torch.allclose(_raw(data, data.test_x)[:, 0], torch.from_numpy(written["test_x"]).float(), atol=1e-3)


def _cifar_cfg(root: Path, dataset: str = "cifar10", download: bool = False, **kw: object) -> TrainConfig:
    return TrainConfig(dataset=dataset, data_dir=str(root), download=download, val_size=5, **kw)


@pytest.mark.parametrize(("classes", "dataset", "n_train"), [(10, "cifar10", 20), (100, "cifar100", 12)])
def test_cifar_format_read_without_checksums(tmp_path: Path, make_cifar, classes, dataset, n_train) -> None:
    written = make_cifar(tmp_path, classes=classes, per_batch=4 if classes == 10 else 12, n_test=6)
    data = load_data(_cifar_cfg(tmp_path, dataset, verify_checksums=False), CPU)
    assert data.train_x.shape == (n_train - 5, 3, 32, 32) and data.val_x.shape == (5, 3, 32, 32)
    assert (data.num_classes, data.in_channels, data.image_size, data.flip_ok) == (classes, 3, 32, True)
    assert data.test_y.tolist() == written["test_y"].tolist()
    assert sorted(torch.cat([data.train_y, data.val_y]).tolist()) == sorted(written["train_y"].tolist())
    pixels = torch.from_numpy(written["test_x"].reshape(-1, 3, 32, 32)).float()  # planar RGB rows -> CHW
    assert torch.allclose(_raw(data, data.test_x), pixels, atol=1e-3)


def test_cifar_with_checksums_refuses_a_modified_copy(tmp_path: Path, make_cifar) -> None:
    make_cifar(tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "cifar-10-batches-py").iterdir()}
    for download in (False, True):
        with pytest.raises(DatasetNotFoundError) as info:
            load_data(_cifar_cfg(tmp_path, download=download), CPU)
        message = str(info.value)
        assert "md5" in message and "verify_checksums = false" in message
        assert str(tmp_path / "cifar-10-batches-py") in message
    assert {p: p.read_bytes() for p in (tmp_path / "cifar-10-batches-py").iterdir()} == before  # untouched


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("cifar10", "cifar-10-batches-py/, taken from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
        ("cifar100", "cifar-100-python/, taken from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
        ("mnist", "MNIST/raw/, taken from https://ossci-datasets.s3.amazonaws.com/mnist/"),
        ("fashion_mnist", "FashionMNIST/raw/"),
    ],
)
def test_missing_directory_without_download(tmp_path: Path, dataset: str, expected: str) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_data(TrainConfig(dataset=dataset, data_dir=str(missing), download=False), CPU)
    message = str(info.value)
    assert str(missing) in message and "download = false" in message and expected in message
    assert "set `download = true`" in message
    assert info.value.dataset == dataset and info.value.directory == str(missing)


@pytest.mark.parametrize(("dataset", "module"), [("mnist", "mnist"), ("cifar10", "cifar")])
def test_failed_download_says_the_network_is_unreachable(tmp_path: Path, monkeypatch, dataset, module) -> None:
    calls = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(f"torchvision.datasets.{module}.download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        load_data(TrainConfig(dataset=dataset, data_dir=str(tmp_path), download=True), CPU)
    assert calls, "a download should have been attempted"
    message = str(info.value)
    assert "downloading it failed" in message and "network" in message and str(tmp_path) in message
    assert "set `download = true`" not in message and "\n" not in message  # it was true; one paragraph


def test_existing_copy_is_read_without_downloading(tmp_path: Path, make_mnist, monkeypatch) -> None:
    make_mnist(tmp_path)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not download when a copy exists")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", no_network)
    data = load_data(TrainConfig(dataset="mnist", data_dir=str(tmp_path), download=True, val_size=10), CPU)
    assert len(data.test_y) == 20


def test_identity_names_the_images_per_class_and_split_not_the_settings() -> None:
    """A study's fingerprint holds it (search/study.py): equal data, equal identity; one image moved from one class
    to another (same totals) changes the digest; one image more changes the totals too."""
    def splits(train_y: list[int]) -> DataSplits:
        y = torch.tensor(train_y)
        x = torch.zeros(len(y), 1, 8, 8)
        held = torch.tensor([0, 1])
        return DataSplits(x, y, x[:2], held, x[:2], held, num_classes=3, in_channels=1, image_size=8,
                          flip_ok=False, name="folder", class_names=("a", "b", "c"))

    base = splits([0, 0, 1, 1, 2, 2]).identity()
    assert base == splits([2, 1, 0, 2, 1, 0]).identity()  # the order of the images is not the data
    assert base["train_images"] == 6 and base["val_images"] == 2 and base["classes"] == 3
    moved = splits([0, 0, 0, 1, 2, 2]).identity()
    assert moved["train_images"] == 6 and moved["digest"] != base["digest"]
    assert splits([0, 0, 1, 1, 2, 2, 2]).identity()["train_images"] == 7

