"""A user's own data: image folders (both layouts, conversion, resizing, the decode cache, bad files),
.npz/.pt arrays, and the streamed placement, all on files the tests write."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from objectives import image_folder
from objectives.data import clear_data_cache, load_data
from objectives.errors import BadDataError, DatasetNotFoundError
from objectives.settings import TrainConfig
from objectives.train import fit
from tests.images import class_image, make_arrays, make_image_folder, write_image

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    clear_data_cache()  # in-process copies; the on-disk decode cache is what these tests look at


def folder_cfg(root: Path, cache: Path, **kw: object) -> TrainConfig:
    return TrainConfig(**{"dataset": "folder", "data_dir": str(root), "cache_dir": str(cache), "image_size": 16,
                          "val_size": 0.2, "test_size": 0.2, **kw})


def test_flat_folder_is_split_stratified_and_named(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets", per_class=25)
    data = load_data(folder_cfg(root, tmp_path / "cache"), CPU)
    assert data.class_names == ("cat", "dog", "fox") and data.num_classes == 3
    assert (data.in_channels, data.image_size, data.train_x.dtype) == (3, 16, torch.uint8)
    sizes = (len(data.train_y), len(data.val_y), len(data.test_y))
    assert sizes == (48, 12, 15)  # test: 20% of 75; validation: 20% of the 60 left
    for y in (data.train_y, data.val_y, data.test_y):  # stratified: every class in every split, evenly
        assert len(set(Counter(y.tolist()).values())) == 1 and set(y.tolist()) == {0, 1, 2}
    assert data.describe()["class_names"] == ["cat", "dog", "fox"] and data.describe()["placement"] == "device"
    other = load_data(folder_cfg(root, tmp_path / "cache", data_seed=1), CPU)
    assert not torch.equal(other.val_x, data.val_x)  # data_seed picks another split


def test_split_layout_keeps_its_folders_and_carves_what_is_missing(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", layout="split", splits={"train": 10, "val": 3})
    data = load_data(folder_cfg(root, tmp_path / "cache", test_size=0.3), CPU)
    assert len(data.val_y) == 9  # the val/ folder, exactly
    assert len(data.test_y) == 9 and len(data.train_y) == 21  # test carved from train/: 30% of 30
    both = make_image_folder(tmp_path / "e", layout="split", splits={"train": 6, "val": 2, "test": 4})
    data = load_data(folder_cfg(both, tmp_path / "cache"), CPU)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (18, 6, 12)


def test_images_are_resized_cropped_and_converted(tmp_path: Path) -> None:
    # A 40x20 image, left half black, right half white: shorter side 20 -> 10, so 20x10, cropped to the middle 10x10.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    path = write_image(tmp_path / "half.png", pixels)
    rgb = image_folder.decode_image(path, 10, 3)
    assert rgb.shape == (3, 10, 10) and rgb.dtype == np.uint8
    assert (rgb[:, :, :4] < 10).all() and (rgb[:, :, 6:] > 245).all()  # the crop keeps the middle: half each
    gray = image_folder.decode_image(write_image(tmp_path / "red.png", np.full((8, 8, 3), (255, 0, 0), np.uint8)), 8, 1)
    assert gray.shape == (1, 8, 8) and abs(int(gray[0, 0, 0]) - 76) <= 1  # Pillow's luma: 0.299 * 255
    single = image_folder.decode_image(write_image(tmp_path / "g.png", np.full((6, 6, 1), 90, np.uint8)), 6, 3)
    assert single.shape == (3, 6, 6) and (single == 90).all()  # grayscale -> RGB repeats the channel


def test_a_photo_is_decoded_upright_as_its_exif_orientation_says(tmp_path: Path) -> None:
    """A phone's photo: pixels as the sensor read them (40x20, left half black), EXIF Orientation 6 (turn 90 degrees
    clockwise to view). Upright it is 20x40 with the black half on top; the crop keeps the middle rows."""
    from PIL import Image

    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = image_folder.decode_image(tmp_path / "phone.jpg", 10, 1)[0]
    assert (upright[:4] < 40).all() and (upright[6:] > 215).all(), upright  # black above, white below
    plain = image_folder.decode_image(write_image(tmp_path / "plain.jpg", pixels), 10, 1)[0]
    assert (plain[:, :4] < 40).all() and (plain[:, 6:] > 215).all()  # no tag: as stored


def test_files_beside_the_class_folders_are_counted_as_ignored(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "pets", per_class=10)
    write_image(root / "stray.png", class_image(0, 99))  # an image in no class folder belongs to no class
    (root / "notes.txt").write_text("labels by hand")
    (root / ".DS_Store").write_text("")  # hidden: not counted
    data = load_data(folder_cfg(root, tmp_path / "cache"), CPU)
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 30
    assert "30 images in 3 classes (flat layout, 2 files outside the class folders ignored)" in capsys.readouterr().err


def test_sixteen_bit_grayscale_is_scaled_not_clipped_to_white(tmp_path: Path) -> None:
    from PIL import Image

    ramp = np.tile(np.linspace(0, 65535, 8).round().astype(np.uint16), (8, 1))  # a 16-bit PNG: mode I;16
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    for channels in (1, 3):
        pixels = image_folder.decode_image(tmp_path / "deep.png", 8, channels)
        assert pixels.shape == (channels, 8, 8)
        assert np.abs(pixels[0, 0].astype(int) - (ramp[0] / 257).round()).max() <= 1  # 0..65535 -> 0..255
    Image.fromarray(np.full((4, 4), 200, np.int32), "I").save(tmp_path / "wide.tif")  # 8-bit values, 32-bit type
    assert (image_folder.decode_image(tmp_path / "wide.tif", 4, 1) == 200).all()


def test_float_images_are_read_as_zero_to_one_and_other_ranges_are_refused(tmp_path: Path) -> None:
    """A 32-bit float TIFF (Pillow's mode F) of values 0..1 becomes 0..255, not the black image Pillow's own
    conversion makes of it (every value rounded to 0 or 1); one with values outside 0..1 is an unreadable image
    whose reason says the range and what to do, as the folder's error shows it."""
    from PIL import Image

    ramp = np.tile(np.linspace(0.0, 1.0, 8, dtype=np.float32), (8, 1))
    Image.fromarray(ramp, "F").save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    for channels in (1, 3):
        pixels = image_folder.decode_image(tmp_path / "unit.tif", 8, channels)
        assert np.abs(pixels[0, 0].astype(int) - (ramp[0] * 255).round()).max() <= 1
    Image.fromarray(ramp * 300, "F").save(tmp_path / "wide.tif")
    with pytest.raises(ValueError, match="values from 0 to 300; float images are read as 0..1"):
        image_folder.decode_image(tmp_path / "wide.tif", 8, 1)
    nan = ramp.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="values from 0 to 1, 1 not finite"):
        image_folder.decode_image(tmp_path / "nan.tif", 8, 1)

    root = make_image_folder(tmp_path / "scans", per_class=6, classes=("a", "b"))
    Image.fromarray(ramp * 300, "F").save(root / "a" / "scan.tif")
    with pytest.raises(BadDataError, match=r"scan.tif cannot be read \(ValueError: a floating-point image with values "
                                           r"from 0 to 300"):
        load_data(folder_cfg(root, tmp_path / "cache"), CPU)


def test_folder_of_grayscale_jpegs_as_one_channel(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "g", per_class=8, ext="jpg", channels=1, classes=("a", "b"))
    data = load_data(folder_cfg(root, tmp_path / "cache", channels=1, image_size=12), CPU)
    assert data.train_x.shape[1:] == (1, 12, 12) and data.in_channels == 1 and not data.flip_ok


def test_decode_once_then_cache_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "pets", per_class=5)
    calls: list[Path] = []
    real = image_folder.decode_image

    def counting(path: Path, size: int, channels: int) -> np.ndarray:
        calls.append(path)
        return real(path, size, channels)

    monkeypatch.setattr(image_folder, "decode_image", counting)
    cfg = folder_cfg(root, tmp_path / "cache")
    first = load_data(cfg, CPU)
    assert len(calls) == 15
    clear_data_cache()
    again = load_data(cfg, CPU)
    assert len(calls) == 15 and torch.equal(again.train_x, first.train_x)  # read from the cache, not decoded
    assert len(list((tmp_path / "cache").glob("pets-*"))) == 1

    changed = root / "dog" / "0.png"
    write_image(changed, class_image(0, 99))
    os.utime(changed, ns=(1, 1))  # a new mtime (and content): the folder hashes differently
    clear_data_cache()
    load_data(cfg, CPU)
    assert len(calls) == 30 and len(list((tmp_path / "cache").glob("pets-*"))) == 2
    clear_data_cache()
    load_data(folder_cfg(root, tmp_path / "cache", image_size=8), CPU)  # another size is another cache
    assert len(calls) == 45


def test_streamed_placement_trains_exactly_like_the_device_path(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets", per_class=10)
    common = {"widths": (8,), "batch_size": 8, "device": "cpu", "augment": True, "flip": True}
    streamed_cfg = folder_cfg(root, tmp_path / "cache", data_budget_mb=0.001, **common)
    streamed = load_data(streamed_cfg, CPU)
    assert streamed.placement == "stream" and "exceed data_budget_mb" in streamed.placement_reason
    split_files = list((tmp_path / "cache").glob("pets-*/splits-*/train.npy"))
    assert len(split_files) == 1  # each split written once, contiguous, and memory-mapped from there
    on_disk = np.load(split_files[0], mmap_mode="r+")
    assert torch.equal(torch.from_numpy(np.array(on_disk)), streamed.train_x)
    original = int(on_disk[0, 0, 0, 0])
    on_disk[0, 0, 0, 0] = (original + 1) % 256
    on_disk.flush()
    assert int(streamed.train_x[0, 0, 0, 0]) == (original + 1) % 256  # a map of the file, not a copy in memory
    on_disk[0, 0, 0, 0] = original
    on_disk.flush()
    on_device = folder_cfg(root, tmp_path / "cache", **common)
    assert load_data(on_device, CPU).placement == "device"
    a = fit(streamed_cfg, max_epochs=2)
    b = fit(on_device, max_epochs=2)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    forced = load_data(folder_cfg(root, tmp_path / "cache", data_placement="stream"), CPU)
    assert forced.placement == "stream" and "data_placement = 'stream'" in forced.placement_reason
    assert re.match(r"[1-9]\d* KiB of images;", forced.placement_reason), forced.placement_reason  # not "0.0 MiB"


def test_a_class_folder_model_learns_the_patterns(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "pets", per_class=30)
    cfg = folder_cfg(root, tmp_path / "cache", widths=(16,), batch_size=16, lr=0.01, device="cpu")
    result = fit(cfg, max_epochs=6)
    assert result.history[-1]["val_accuracy"] > 0.8


# --- bad folders: each a clear error naming the file or folder -----------------------------------------------


def _fails(cfg: TrainConfig, error: type[Exception], *needles: str) -> str:
    with pytest.raises(error) as info:
        load_data(cfg, CPU)
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_missing_data_dir(tmp_path: Path) -> None:
    _fails(folder_cfg(tmp_path / "nowhere", tmp_path / "c"), DatasetNotFoundError, str(tmp_path / "nowhere"),
           "one subfolder per class")


def test_no_class_folders_and_a_single_class(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "loose.png").write_bytes(b"")
    _fails(folder_cfg(tmp_path / "empty", tmp_path / "c"), BadDataError, "has no class folders",
           str(tmp_path / "empty"))
    one = make_image_folder(tmp_path / "one", classes=("only",), per_class=3)
    _fails(folder_cfg(one, tmp_path / "c"), BadDataError, "single class folder", "'only'", "at least 2 classes")


def test_class_folders_one_level_too_deep_say_where_to_point(tmp_path: Path) -> None:
    inner = make_image_folder(tmp_path / "data" / "pets", per_class=3)
    message = _fails(folder_cfg(tmp_path / "data", tmp_path / "c"), BadDataError, "'cat', 'dog', 'fox'",
                     "one level deeper", f"Point data_dir at {inner}.")
    assert "single class folder" not in message
    split = make_image_folder(tmp_path / "s" / "train" / "images", per_class=3)
    _fails(folder_cfg(tmp_path / "s", tmp_path / "c"), BadDataError,
           f"Move the class folders from {split} up into {tmp_path / 's' / 'train'}.")


def test_class_folder_without_images(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=4, classes=("a", "b"))
    (root / "c").mkdir()
    (root / "c" / "notes.txt").write_text("not an image")
    _fails(folder_cfg(root, tmp_path / "c"), BadDataError, f"class folder {root / 'c'} holds no images")


def test_classes_emptied_by_carving_the_held_out_splits_are_refused(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=1)  # test and validation each take one of the 3 images
    message = _fails(folder_cfg(root, tmp_path / "c"), BadDataError, str(root), "test and validation",
                     "no training images left", "(1 image)", "val/ and test/ folders")
    assert len(re.findall(r"'(?:cat|dog|fox)' \(1 image\)", message)) == 2
    given = make_image_folder(tmp_path / "e", layout="split", splits={"train": 1, "val": 1, "test": 1})
    data = load_data(folder_cfg(given, tmp_path / "c"), CPU)  # nothing carved: one training image each is enough
    assert sorted(data.train_y.tolist()) == [0, 1, 2]


def test_val_class_missing_from_train(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", layout="split", splits={"train": 4, "val": 2}, classes=("a", "b"))
    write_image(root / "val" / "zebra" / "0.png", class_image(0, 0))
    _fails(folder_cfg(root, tmp_path / "c"), BadDataError, str(root / "val"), "'zebra'", str(root / "train"))


def test_corrupt_image_is_named_and_can_be_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_image_folder(tmp_path / "d", per_class=10, classes=("a", "b"))
    bad = root / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    _fails(folder_cfg(root, tmp_path / "c"), BadDataError, str(bad), "skip_bad_images = true")
    data = load_data(folder_cfg(root, tmp_path / "c", skip_bad_images=True), CPU)
    assert len(data.train_y) + len(data.val_y) + len(data.test_y) == 20 and data.skipped == ("b/broken.jpg",)
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    clear_data_cache()  # the cache remembers the bad file: without skip_bad_images it is refused again
    _fails(folder_cfg(root, tmp_path / "c"), BadDataError, str(bad))


# --- arrays ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "dtype"), [("NHWC", "uint8"), ("NCHW", "float32")])
def test_npz_arrays_in_either_layout(tmp_path: Path, layout: str, dtype: str) -> None:
    arrays = make_arrays(n_train=60, layout=layout, dtype=dtype)
    np.savez(tmp_path / "data.npz", **arrays)
    data = load_data(TrainConfig(dataset="arrays", data_file=str(tmp_path / "data.npz"), val_size=0.25), CPU)
    assert data.train_x.shape[1:] == (3, 12, 12) and data.train_x.dtype == getattr(torch, dtype)
    assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (45, 15, 20)  # val carved, test given
    assert data.class_names == ("0", "1", "2")
    expected = torch.from_numpy(arrays["x_test"])
    expected = expected.permute(0, 3, 1, 2) if layout == "NHWC" else expected
    assert torch.equal(data.test_x, expected)  # the file's own test split, in its order


def test_pt_arrays_with_class_names_conversion_and_resize(tmp_path: Path) -> None:
    arrays = {k: torch.from_numpy(v) for k, v in make_arrays(n_train=30).items()}
    torch.save({**arrays}, tmp_path / "data.pt")
    np.savez(tmp_path / "named.npz", **{k: v.numpy() for k, v in arrays.items()}, classes=np.array(["r", "g", "b"]))
    data = load_data(TrainConfig(dataset="arrays", data_file=str(tmp_path / "data.pt"), channels=1, image_size=8,
                                 val_size=5), CPU)
    assert data.train_x.shape[1:] == (1, 8, 8) and data.train_x.dtype == torch.uint8
    named = load_data(TrainConfig(dataset="arrays", data_file=str(tmp_path / "named.npz"), val_size=5), CPU)
    assert named.class_names == ("r", "g", "b")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda a: a.pop("y_train"), "needs x_train and y_train"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "has 60 images but y_train has 59 labels"),
        (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), "must be integer class indices"),
        (lambda a: a.update(y_train=a["y_train"] - 1), "is negative"),
        (lambda a: a.update(classes=np.array(["a", "b"])), "out of range for the 2 names"),
        (lambda a: a.update(x_test=a["x_test"][:, :8]), "all images must have one shape"),
        (lambda a: a.update(x_val=a["x_test"]), "x_val without y_val"),
        (lambda a: a.update(x_train=a["x_train"][:, :, :, :2]), "neither 1 nor 3 channels"),
        # labels 0, 1, 3: class '2' has no images, which is a gap in the numbering, not an unreadable image
        (lambda a: a.update(y_train=np.where(a["y_train"] == 2, 3, a["y_train"])),
         "class(es) '2' have no training images (in y_train: the classes are the label indices 0..K-1"),
    ],
)
def test_bad_arrays_are_named(tmp_path: Path, change, needle: str) -> None:
    arrays = make_arrays(n_train=60)
    change(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    _fails(TrainConfig(dataset="arrays", data_file=str(path)), BadDataError, str(path), needle)


def test_missing_or_unreadable_array_file(tmp_path: Path) -> None:
    _fails(TrainConfig(dataset="arrays", data_file=str(tmp_path / "none.npz")), DatasetNotFoundError, "none.npz")
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 torn")
    _fails(TrainConfig(dataset="arrays", data_file=str(tmp_path / "torn.npz")), BadDataError, "torn.npz",
           "could not be read")
    (tmp_path / "data.csv").write_text("1,2,3")
    _fails(TrainConfig(dataset="arrays", data_file=str(tmp_path / "data.csv")), BadDataError, "must end in .npz")
