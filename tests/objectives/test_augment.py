import pytest
import torch
import torch.nn.functional as F

from objectives.augment import augment_batch, default_crop_padding


def _images(n: int = 64, c: int = 3, size: int = 8) -> torch.Tensor:
    # Distinct random values, so every translation and mirror of an image is distinguishable.
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(0)) + 1.0


def test_no_padding_no_flip_is_identity() -> None:
    x = _images()
    assert torch.equal(augment_batch(x, padding=0, flip=False), x)


@pytest.mark.parametrize(("padding", "flip"), [(0, True), (2, False), (4, True)])
def test_shape_and_dtype_preserved(padding: int, flip: bool) -> None:
    x = _images(n=16, c=1, size=28)
    out = augment_batch(x, padding, flip, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype


def test_flip_mirrors_about_half_and_nothing_else() -> None:
    x = _images(n=2000, c=1)
    out = augment_batch(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)
    assert 0.45 < mirrored.float().mean() < 0.55


def test_crops_are_translations_of_the_zero_padded_input() -> None:
    pad, size = 2, 8
    x = _images(n=400, size=size)
    out = augment_batch(x, padding=pad, flip=False, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (pad, pad, pad, pad))
    seen = set()
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + size, dx : dx + size])
        ]
        assert len(matches) == 1, f"image {i} is not a translation of its input"
        seen.add(matches[0])
    assert len(seen) == (2 * pad + 1) ** 2  # every offset, including the identity, gets used


def test_same_generator_seed_same_augmentation() -> None:
    x = _images()
    a = augment_batch(x, 4, True, torch.Generator().manual_seed(7))
    b = augment_batch(x, 4, True, torch.Generator().manual_seed(7))
    c = augment_batch(x, 4, True, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_default_padding_by_image_size() -> None:
    assert [default_crop_padding(s) for s in (32, 28, 8, 64)] == [4, 2, 1, 8]
