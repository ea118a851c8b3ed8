"""Random crops and flips as whole-batch tensor ops, so augmentation runs on the GPU with the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_DEFAULT_PADDING = {32: 4, 28: 2, 8: 1}


def default_crop_padding(image_size: int) -> int:
    """The customary crop padding: 4 px for 32x32, 2 for 28x28, 1 for 8x8, about 1/8 of the side otherwise."""
    return _DEFAULT_PADDING.get(image_size, max(1, image_size // 8))


def augment_batch(x: Tensor, padding: int, flip: bool, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image of an NCHW batch by up to `padding` px (zero fill) and mirror about half.

    Equivalent to torchvision's RandomCrop(size, padding) + RandomHorizontalFlip per image, but done
    with two gathers over the padded batch instead of a Python loop. Zero is the data set mean after
    normalisation. Random numbers come from `generator` (on its own device) for reproducible epochs.
    """
    n, _, h, w = x.shape
    gen_device = generator.device if generator is not None else x.device
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=gen_device).to(x.device)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (n, h)
        cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (n, w)
        picked = padded.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, padded.shape[3]))
        x = picked.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], h, -1))
    if flip:
        mirror = torch.rand(n, generator=generator, device=gen_device).to(x.device) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x
