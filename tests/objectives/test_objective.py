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
