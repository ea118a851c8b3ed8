"""CIFAR readers that skip torchvision's md5 checks, for copies that cannot match the official files.

Selected by `verify_checksums = false`. Meant for user-made or trimmed copies in the official pickle
format (e.g. a 5k-image CIFAR-10 for a laptop smoke test, or files written by the test suite); a
genuine download should keep verification on so a truncated file is caught.
"""

from __future__ import annotations

from torchvision.datasets import CIFAR10, CIFAR100


def _unverified(files: list[list[str]]) -> list[list[str | None]]:
    # check_integrity(path, md5=None) only checks that the file exists
    return [[name, None] for name, _ in files]


class UnverifiedCIFAR10(CIFAR10):
    """CIFAR-10 from `cifar-10-batches-py/`, requiring the files to exist but not their md5 sums."""

    train_list = _unverified(CIFAR10.train_list)
    test_list = _unverified(CIFAR10.test_list)
    meta = {**CIFAR10.meta, "md5": None}


class UnverifiedCIFAR100(CIFAR100):
    """CIFAR-100 from `cifar-100-python/`, requiring the files to exist but not their md5 sums."""

    train_list = _unverified(CIFAR100.train_list)
    test_list = _unverified(CIFAR100.test_list)
    meta = {**CIFAR100.meta, "md5": None}
