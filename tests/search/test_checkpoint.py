"""Checkpoints: atomic writes and a safe, explained refusal of anything torch.load(weights_only=True) refuses."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import search.checkpoint as checkpoint
from search.checkpoint import load_checkpoint, save_atomic
from search.errors import HpoError
from tests.search.failure_helpers import interrupt_on_write

CALLS: list[str] = []


def _record(tag: str) -> str:
    CALLS.append(tag)
    return tag


class Payload:
    """A custom class: a weights_only load must refuse it and never run its __reduce__ target."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record, ("unpickled",))


def sample() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    return {
        "state_dict": {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen), "conv.bias": torch.zeros(4),
                       "bn.num_batches_tracked": torch.tensor(7)},
        "model_spec": {"widths": [16, 32], "activation": "relu", "dropout": 0.25},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "epoch": 3,
        "best": 0.875,
        "early_stopping": {"wait": 1, "best": None, "mode": "max"},
    }


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- save_atomic -----------------------------------------------------------------------------------------------


def test_save_atomic_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    assert save_atomic(sample(), path) == path
    assert_same(torch.load(path, weights_only=True), sample())
    assert_same(load_checkpoint(path), sample())
    assert_same(load_checkpoint(str(path)), sample())


def test_save_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_atomic(sample(), path)
    save_atomic({**sample(), "epoch": 4}, path)
    assert files_in(tmp_path) == ["best.pt"]
    assert load_checkpoint(path)["epoch"] == 4


def test_save_atomic_creates_missing_folders(tmp_path: Path) -> None:
    path = tmp_path / "trial_0003" / "checkpoints" / "last.pt"
    save_atomic(sample(), path)
    assert files_in(path.parent) == ["last.pt"]
    assert load_checkpoint(path)["epoch"] == 3


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    save_atomic(sample(), path)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_atomic({"state_dict": {}, "hook": lambda: None}, path)  # a lambda cannot be pickled
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["best.pt"]
    assert_same(load_checkpoint(path), sample())


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.pt"
    save_atomic(sample(), path)
    before = path.read_bytes()

    def half_then_interrupt(obj: Any, fh: Any) -> None:
        fh.write(before[: len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({**sample(), "epoch": 9}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["best.pt"]


def test_ctrl_c_mid_write_is_raised_as_itself_not_as_the_zip_writers_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save's zip writer, closed after a Ctrl-C cut its write short, raises its own RuntimeError ("unexpected
    pos"), which hid the interrupt: a packed trial was recorded failed with that traceback, not interrupted (CI)."""
    path = tmp_path / "last.pt"
    save_atomic(sample(), path)
    before = path.read_bytes()

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    interrupt_on_write(monkeypatch, 3, ctrl_c)
    with pytest.raises(KeyboardInterrupt) as raised:
        save_atomic({**sample(), "epoch": 9}, path)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    monkeypatch.undo()
    assert path.read_bytes() == before and files_in(tmp_path) == ["last.pt"]


def test_failed_replace_removes_the_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "best.pt"
    save_atomic(sample(), path)
    before = path.read_bytes()

    def refuse(src: Any, dst: Any) -> None:
        raise PermissionError("read-only")

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    with pytest.raises(PermissionError):
        save_atomic({**sample(), "epoch": 9}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert files_in(tmp_path) == ["best.pt"]


def test_save_under_a_file_fails_and_touches_nothing(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        save_atomic(sample(), blocker / "best.pt")
    assert blocker.read_text() == "not a folder"
    assert files_in(tmp_path) == ["runs"]


# --- load_checkpoint refusals ----------------------------------------------------------------------------------


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(HpoError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert repr(str(path)) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    refused(path, "is corrupt", "weights_only=True")


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    good = save_atomic(sample(), tmp_path / "good.pt").read_bytes()
    path = tmp_path / "cut.pt"
    for size in (len(good) // 2, len(good) - 10, 100):
        path.write_bytes(good[:size])
        refused(path, "is corrupt", "weights_only=True", "delete it and rerun the trial")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    # A zero-byte file (a crash before the first write) raises EOFError() with an empty message.
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    refused(path, "is corrupt", "weights_only=True")


@pytest.mark.parametrize("data", [b"hello world", b"\x80", b"\x80\x02", b"PK\x03\x04", b"\x80\x02}q\x00(X"],
                         ids=["text", "proto-byte", "proto-header", "zip-magic", "cut-pickle"])
def test_short_garbage_is_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(data)
    refused(path, "weights_only=True")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_damaged_bytes_always_give_hpo_error(tmp_path: Path, zip_format: bool) -> None:
    # Whatever torch trips over inside a damaged file (UnpicklingError, EOFError, IndexError, KeyError,
    # struct.error, ...), the caller gets an HpoError or, when the damage missed, a valid load.
    source = tmp_path / "good.pt"
    torch.save(sample(), source, _use_new_zipfile_serialization=zip_format)
    good = source.read_bytes()
    rng = random.Random(1)
    path = tmp_path / "damaged.pt"
    refusals = 0
    for _ in range(300):
        data = bytearray(good)
        if rng.random() < 0.7:
            for _ in range(rng.choice([1, 4, 32])):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            del data[rng.randrange(len(data)):]
        path.write_bytes(bytes(data))
        try:
            load_checkpoint(path)
        except HpoError as exc:
            assert "weights_only=True" in str(exc) or "not a checkpoint of this tool" in str(exc)
            refusals += 1
    assert refusals > 100


def test_custom_class_is_refused_without_running_its_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "extra": Payload()}, path)
    CALLS.clear()
    refused(path, "holds more than tensors and plain values", "weights_only=True", "only if you trust")
    assert CALLS == []


def test_plain_pickle_of_a_custom_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=2))
    CALLS.clear()
    refused(path, "weights_only=True")
    assert CALLS == []


@pytest.mark.parametrize(
    ("payload", "kind"),
    [([1, 2, 3], "list"), (torch.ones(2), "Tensor"), ({"model_spec": {}}, "dict"), ({"weights": {}}, "dict"),
     (42, "int")],
    ids=["list", "tensor", "dict-without-state_dict", "other-dict", "int"],
)
def test_valid_torch_file_that_is_not_a_checkpoint(tmp_path: Path, payload: Any, kind: str) -> None:
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    refused(path, "is not a checkpoint of this tool", "'state_dict'", f"got {kind}")


def test_missing_checkpoint(tmp_path: Path) -> None:
    refused(tmp_path / "nope.pt", "does not exist")


def test_a_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(HpoError, match="does not exist"):
        load_checkpoint(tmp_path)


def test_minimal_checkpoint_loads(tmp_path: Path) -> None:
    path = tmp_path / "min.pt"
    torch.save({"state_dict": {"w": torch.arange(3)}}, path)
    loaded = load_checkpoint(path)
    assert list(loaded) == ["state_dict"] and torch.equal(loaded["state_dict"]["w"], torch.arange(3))
