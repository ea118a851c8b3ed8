"""The cnn objective's start-of-run line (`describe`): what a user reads first about the data and the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from objectives.objective import CNNObjective
from search.config import load_settings

QUICKSTART = Path(__file__).resolve().parents[2] / "studies" / "quickstart.toml"


@pytest.mark.parametrize(("overrides", "expected"), [
    ([], "; model cnn"),
    (["objective.pool_first=true", "objective.compile=true"], "; model cnn (pool_first), compiled"),
    pytest.param(["objective.cuda_graphs=true"], "; model cnn, cuda_graphs ignored on cpu (steps run eagerly)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="says what happens without CUDA")),
])
def test_the_start_line_names_the_model_and_how_its_steps_run(overrides: list[str], expected: str) -> None:
    line = CNNObjective(load_settings(QUICKSTART, overrides)).describe()
    assert line.startswith("data digits: 1150 train / 287 val / 360 test images, 10 classes, 1x8x8; on the device")
    assert line.endswith(expected), line


TINY = """
[study]
name = "tiny"
direction = "maximize"
metric = "val_accuracy"
max_epochs = 2
[space.lr]
type = "float"
low = 1e-3
high = 1e-1
log = true
[objective]
name = "cnn"
dataset = "synthetic"
synthetic_shape = [1, 8, 8]
synthetic_classes = 3
synthetic_train = 9
synthetic_val = 6
synthetic_test = 6
batch_size = 32
widths = [4]
device = "cpu"
"""


def test_a_training_split_smaller_than_a_batch_is_warned_once_per_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """9 training images and batch_size 32: every epoch is one step on the whole split, said once at the start."""
    from search.cli import main

    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    warning = ("warning: the training split has 9 images, fewer than batch_size 32: a trial whose batch size is above "
               "9 trains on the whole split as one batch, one optimiser step an epoch, so it learns little. Add "
               "training images, or lower the batch size to 9 or less.")
    assert CNNObjective(load_settings(study, [])).describe().endswith("\n" + warning)
    sampled = CNNObjective(load_settings(QUICKSTART, ["objective.dataset=synthetic", "objective.synthetic_train=40",
                                                      "objective.synthetic_shape=[1,8,8]"])).describe()
    assert "fewer than batch sizes up to 128 ([space.batch_size]): a trial whose batch size is above 40" in sampled
    assert "warning" not in CNNObjective(load_settings(study, ["objective.batch_size=9"])).describe()
    code = main(["run", str(study), "--trials", "2", "--run-dir", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count(warning) == 1, err
