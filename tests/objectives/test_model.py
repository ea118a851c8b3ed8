from pathlib import Path

import pytest
import torch
from torch import nn

from objectives.model import SPEC_KEYS, build_model
from objectives.networks import network_spec
from objectives.settings import TrainConfig


def model_spec(cfg: TrainConfig, channels: int, size: int, classes: int = 10) -> dict[str, object]:
    """The CNN's keys of the spec the training loop builds (`network_spec`), as a legacy checkpoint holds them."""
    spec = network_spec(cfg, num_classes=classes, in_channels=channels, image_size=size,
                        class_names=[str(i) for i in range(classes)])
    return {key: spec[key] for key in SPEC_KEYS}


@pytest.mark.parametrize(("channels", "size", "pools"), [(1, 8, 2), (1, 28, 3), (3, 32, 3)])
def test_forward_shapes_and_pooling_floor(channels: int, size: int, pools: int) -> None:
    cfg = TrainConfig(widths=(8, 16, 24), blocks_per_stage=2, activation="gelu", dropout=0.2)
    spec = model_spec(cfg, channels, size, classes=7)
    model = build_model(spec)
    assert model(torch.randn(5, channels, size, size)).shape == (5, 7)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools  # 8x8 stops at 2x2
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 6
    dropout = next(m for m in model.modules() if isinstance(m, nn.Dropout))
    assert dropout.p == 0.2


def test_spec_is_plain_data() -> None:
    spec = model_spec(TrainConfig(), 1, 8)
    assert spec == {
        "in_channels": 1,
        "num_classes": 10,
        "widths": [32, 64],
        "blocks_per_stage": 1,
        "activation": "relu",
        "dropout": 0.0,
        "image_size": 8,
    }


def test_checkpoint_round_trip_with_weights_only(tmp_path: Path) -> None:
    spec = model_spec(TrainConfig(widths=(8, 16)), 3, 32)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.eval()
    path = tmp_path / "model.pt"
    torch.save({"model_spec": spec, "state_dict": model.state_dict()}, path)

    checkpoint = torch.load(path, weights_only=True)
    rebuilt = build_model(checkpoint["model_spec"])
    rebuilt.load_state_dict(checkpoint["state_dict"])
    rebuilt.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(rebuilt(x), model(x))


def test_bad_spec_is_rejected() -> None:
    spec = model_spec(TrainConfig(), 1, 8)
    with pytest.raises(ValueError, match="missing \\['dropout'\\]"):
        build_model({k: v for k, v in spec.items() if k != "dropout"})
    with pytest.raises(ValueError, match="unknown \\['depth'\\]"):
        build_model({**spec, "depth": 3})
    with pytest.raises(ValueError, match="unknown activation"):
        build_model({**spec, "activation": "tanh"})


@pytest.mark.parametrize(("size", "pools"), [(32, 3), (8, 2)])
def test_pool_first_pools_after_each_stages_first_conv_with_the_same_parameters(size: int, pools: int) -> None:
    """conv, pool, BatchNorm, activation opens each stage that pools; the maps shrink at the stage's first conv,
    so the later convs of a stage see a quarter of the pixels; the same parameters and the same pooling floor."""
    cfg = TrainConfig(widths=(8, 16, 24), blocks_per_stage=2)
    spec = model_spec(cfg, 3, size)
    plain, first = build_model(spec), build_model({**spec, "pool_first": True})
    assert [type(m) for m in first.features[0]] == [nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU]
    assert [type(m) for m in first.features[1]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert not any(isinstance(m, nn.MaxPool2d) for m in first.features.children())  # none between stages
    assert sum(isinstance(m, nn.MaxPool2d) for m in first.modules()) == pools
    assert [p.shape for p in first.parameters()] == [p.shape for p in plain.parameters()]
    sizes = []
    for block in first.features:
        block.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    assert first(torch.randn(2, 3, size, size)).shape == (2, 10)
    expected = {32: [16, 16, 8, 8, 4, 4], 8: [4, 4, 2, 2, 2, 2]}[size]
    assert sizes == expected
