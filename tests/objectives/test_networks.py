import io
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

from objectives.errors import ModelError
from objectives.model import CNN, SPEC_KEYS
from objectives.networks import build_network, check_network, network_spec
from objectives.settings import TrainConfig
from objectives.train import fit

CLASSES = [f"c{i}" for i in range(10)]


def _spec(model: str, *, channels: int = 3, dropout: float = 0.3, **model_args: Any) -> dict[str, Any]:
    cfg = TrainConfig(model=model, model_args=model_args, dropout=dropout)
    return network_spec(cfg, num_classes=10, in_channels=channels, image_size=32, class_names=CLASSES)


def _images(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(2, channels, size, size)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _dropouts(model: nn.Module) -> dict[str, float]:
    return {path: m.p for path, m in model.named_modules() if isinstance(m, nn.Dropout)}


def test_cnn_spec_is_plain_and_legacy_spec_builds_the_same_cnn() -> None:
    cfg = TrainConfig(widths=(8, 16), blocks_per_stage=2, activation="gelu", dropout=0.25)
    spec = network_spec(cfg, num_classes=10, in_channels=1, image_size=8, class_names=CLASSES)
    assert spec == {
        "model": "cnn", "model_args": {}, "num_classes": 10, "in_channels": 1, "image_size": 8, "dropout": 0.25,
        "class_names": CLASSES, "widths": [8, 16], "blocks_per_stage": 2, "activation": "gelu",
    }
    buffer = io.BytesIO()
    torch.save(spec, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == spec
    model = check_network(spec, _images(1, 8))
    assert isinstance(model, CNN) and model.training
    assert model.dropout.p == 0.25
    legacy = build_network({key: spec[key] for key in SPEC_KEYS})
    assert isinstance(legacy, CNN) and _shapes(legacy) == _shapes(model)


def test_pool_first_is_in_the_spec_only_when_set_and_builds_that_order() -> None:
    """Specs of the default order stay what earlier checkpoints hold (no new key), so their trials still resume."""
    kw = {"num_classes": 10, "in_channels": 3, "image_size": 32, "class_names": CLASSES}
    assert "pool_first" not in network_spec(TrainConfig(widths=(8, 16)), **kw)
    spec = network_spec(TrainConfig(widths=(8, 16), pool_first=True), **kw)
    assert spec["pool_first"] is True
    model = check_network(spec, _images(3, 32))
    assert [type(m) for m in model.features[0]][:2] == [nn.Conv2d, nn.MaxPool2d]


def test_torchvision_spec_survives_a_weights_only_load() -> None:
    spec = _spec("torchvision:resnet18", weights=None, small_input=True, zero_init_residual=True)
    buffer = io.BytesIO()
    torch.save(spec, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded == spec and "widths" not in loaded
    assert _shapes(build_network(loaded)) == _shapes(build_network(spec))


@pytest.mark.parametrize(
    ("name", "dropout_paths", "linear_path"),
    [
        ("resnet18", ["fc.0"], "fc.1"),  # no Dropout in the head: one added before fc
        ("mobilenet_v3_small", ["classifier.2"], "classifier.3"),  # its own classifier Dropout set
        ("efficientnet_b0", ["classifier.0"], "classifier.1"),
        ("convnext_tiny", ["classifier.2.0"], "classifier.2.1"),  # LayerNorm, Flatten, then the added Dropout
    ],
)
def test_torchvision_dropout_lands_in_the_head(name: str, dropout_paths: list[str], linear_path: str) -> None:
    spec = _spec(f"torchvision:{name}", dropout=0.35)
    model = check_network(spec, _images())
    assert {p: v for p, v in _dropouts(model).items() if v == 0.35} == dict.fromkeys(dropout_paths, 0.35)
    head = model.get_submodule(linear_path)
    assert isinstance(head, nn.Linear) and head.out_features == 10
    again = build_network(spec)  # a checkpoint's state_dict fits the rebuilt network
    assert _shapes(again) == _shapes(model)
    again.load_state_dict(model.state_dict())
    other_dropout = build_network({**spec, "dropout": 0.0})  # tuned dropout never changes the architecture
    assert _shapes(other_dropout) == _shapes(model)


def test_resnet18_with_one_input_channel() -> None:
    gray, rgb = build_network(_spec("torchvision:resnet18", channels=1)), build_network(_spec("torchvision:resnet18"))
    assert gray.conv1.in_channels == 1
    assert (gray.conv1.kernel_size, gray.conv1.stride, gray.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    count = sum(p.numel() for p in rgb.parameters()) - sum(p.numel() for p in gray.parameters())
    assert count == 64 * 2 * 7 * 7
    assert check_network(_spec("torchvision:resnet18", channels=1), _images(1))(_images(1)).shape == (2, 10)


def test_small_input_gives_resnet_the_cifar_stem() -> None:
    model = check_network(_spec("torchvision:resnet18", channels=1, small_input=True), _images(1))
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    sizes: list[tuple[int, ...]] = []
    model.layer4.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape)))
    model.eval()
    with torch.no_grad():
        assert model(_images(1)).shape == (2, 10)
    assert sizes == [(2, 512, 4, 4)]  # the ImageNet stem leaves 1x1 at 32x32


def test_small_input_is_refused_outside_the_resnet_family() -> None:
    with pytest.raises(ModelError, match="small_input is for ResNet-family models only") as err:
        build_network(_spec("torchvision:mobilenet_v3_small", small_input=True))
    assert "'torchvision:mobilenet_v3_small'" in str(err.value)


def test_unknown_torchvision_model_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="no classification model 'mobilenet_v3'") as err:
        build_network(_spec("torchvision:mobilenet_v3"))
    assert "did you mean" in str(err.value) and "mobilenet_v3_small" in str(err.value)
    assert "mobilenet_v3_large" in str(err.value)


def test_unknown_builder_argument_is_named() -> None:
    with pytest.raises(ModelError, match=r"resnet18 builder rejected model_args \['depth'\]") as err:
        build_network(_spec("torchvision:resnet18", depth=3))
    assert "unexpected keyword argument 'depth'" in str(err.value)


def test_model_args_cannot_set_what_the_objective_sets() -> None:
    with pytest.raises(ModelError, match=r"model_args sets \['num_classes'\]"):
        build_network(_spec("torchvision:resnet18", num_classes=5))


def test_spec_with_missing_keys_is_refused() -> None:
    spec = _spec("torchvision:resnet18")
    del spec["num_classes"]
    with pytest.raises(ModelError, match=r"missing \['num_classes'\]"):
        build_network(spec)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """An empty torch hub cache under tmp_path and a downloader that fails as on a machine without network
    (torchvision fetches through torch.hub.download_url_to_file); returns the URLs it was asked for."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    asked: list[str] = []

    def no_network(url: str, *args: Any, **kwargs: Any) -> None:
        asked.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return asked


def test_pretrained_weights_missing_offline(offline: list[str], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not in torch's hub cache and could not be downloaded") as err:
        build_network(_spec("torchvision:resnet18", weights="DEFAULT"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    assert offline == [weights.url]
    message = str(err.value)
    assert Path(weights.url).name in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "network access" in message and "drop model_args.weights" in message


def test_pretrained_weights_from_the_cache(offline: list[str], tmp_path: Path) -> None:
    # torch.hub checks the hash in the file name only while downloading, so a cached file of that name is
    # loaded as it is: this stands in for a real download, with recognisable values
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    fake = torchvision.models.resnet18()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(fake.state_dict(), cache / Path(weights.url).name)

    spec = _spec("torchvision:resnet18", channels=1, dropout=0.2, weights="DEFAULT")
    model = check_network(spec, _images(1))
    assert offline == []
    torch.testing.assert_close(model.layer1[0].conv1.weight, fake.layer1[0].conv1.weight)
    torch.testing.assert_close(model.conv1.weight, fake.conv1.weight.sum(dim=1, keepdim=True))
    assert isinstance(model.fc[1], nn.Linear) and (model.fc[1].in_features, model.fc[1].out_features) == (512, 10)
    assert model.fc[0].p == 0.2
    assert _shapes(model) == _shapes(build_network(_spec("torchvision:resnet18", channels=1)))
    with pytest.raises(ModelError, match="use one of IMAGENET1K_V1, DEFAULT"):
        build_network(_spec("torchvision:resnet18", weights="IMAGENET22K"))


def test_damaged_cached_weights(offline: list[str], tmp_path: Path) -> None:
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=f"weights in {re.escape(str(cached))} do not load into resnet18"):
        build_network(_spec("torchvision:resnet18", weights="DEFAULT"))
    assert offline == []


MODELS_PY = """
from pathlib import Path

from torch import nn

with open(Path(__file__).with_name("imports.log"), "a") as log:
    log.write("imported\\n")


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, dropout, width=8, features=None):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(features or width, num_classes),
        )

    def forward(self, x):
        return self.body(x)


class TupleNet(Net):
    def forward(self, x):
        return self.body(x), x


class TrainTupleNet(Net):
    def forward(self, x):
        return (self.body(x), x) if self.training else self.body(x)


def build(num_classes, in_channels, dropout, width=8):
    return Net(num_classes, in_channels, dropout, width)


def wrong_classes(num_classes, in_channels, dropout):
    return Net(7, in_channels, dropout)


def raises(num_classes, in_channels, dropout):
    raise ValueError("width must be even")


def not_a_module(num_classes, in_channels, dropout):
    return {"weights": 1}


def no_dropout(num_classes, in_channels):
    return Net(num_classes, in_channels, 0.0)


def tuple_output(num_classes, in_channels, dropout):
    return TupleNet(num_classes, in_channels, dropout)


def tuple_while_training(num_classes, in_channels, dropout):
    return TrainTupleNet(num_classes, in_channels, dropout)


def breaks_in_forward(num_classes, in_channels, dropout):
    return Net(num_classes, in_channels, dropout, width=8, features=12)


def grayscale_only(num_classes, in_channels, dropout):
    return Net(num_classes, 1, dropout)


class RaisingNet(Net):
    def forward(self, x):
        raise ValueError("no forward yet")


def raises_in_forward(num_classes, in_channels, dropout):
    return RaisingNet(num_classes, in_channels, dropout)


NOT_CALLABLE = 3
"""


@pytest.fixture
def models_py(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(MODELS_PY)
    return path


def test_factory_from_a_file_is_imported_once(models_py: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(f"{models_py}:build", channels=1, dropout=0.4, width=6)
    first = check_network(spec, _images(1))
    assert first(_images(1)).shape == (2, 10)
    assert (first.body[0].in_channels, first.body[4].p, first.body[5].in_features) == (1, 0.4, 6)
    monkeypatch.chdir(models_py.parent)  # a relative reference, resolved against the working directory
    second = build_network({**spec, "model": "my_models.py:build"})
    assert type(second) is type(first)
    assert _shapes(second) == _shapes(first)
    log = models_py.with_name("imports.log")
    assert log.read_text().splitlines() == ["imported"]

    models_py.write_text(MODELS_PY + "\n# edited\n")
    stat = models_py.stat()
    os.utime(models_py, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited file is imported again
    third = build_network(spec)
    assert type(third) is not type(first)
    assert log.read_text().splitlines() == ["imported", "imported"]


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    package = tmp_path / "hpo_test_user_nets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(MODELS_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package.name
    for name in [n for n in sys.modules if n.startswith(package.name)]:
        del sys.modules[name]


def test_factory_from_an_importable_module(user_package: str) -> None:
    model = check_network(_spec(f"{user_package}.nets:build", width=5), _images())
    assert type(model).__module__ == f"{user_package}.nets"
    assert model.body[5].in_features == 5


@pytest.mark.parametrize(
    ("attr", "expected"),
    [
        ("raises", "the factory raised ValueError: width must be even"),
        ("not_a_module", "the factory returned a value of type dict, not an nn.Module"),
        ("missing", "has no attribute 'missing'"),
        ("NOT_CALLABLE", "'NOT_CALLABLE' in file .* is a value of type int, not a function"),
        ("no_dropout", r"cannot be called as build\(num_classes, in_channels, dropout, \*\*model_args\)"),
        ("wrong_classes", r"maps a \(2, 3, 32, 32\) batch to \(2, 7\); expected \(2, 10\) logits"),
        ("tuple_output", r"returns a value of type tuple for a \(2, 3, 32, 32\) batch"),
        ("breaks_in_forward", r"fails on a \(2, 3, 32, 32\) batch of images: RuntimeError: .*set image_size"),
        ("grayscale_only", r"The images have 3 channels but the model's first convolution \(body.0: Conv2d\) takes "
                           r"1: build it with the in_channels the factory is given .*, or set channels = 1"),
        ("raises_in_forward", r"ValueError: no forward yet \(raised at .*my_models.py line \d+, in forward: "
                              r"`raise ValueError\(\"no forward yet\"\)`\)"),
    ],
)
def test_bad_factories_are_reported(models_py: Path, attr: str, expected: str) -> None:
    reference = f"{models_py}:{attr}"
    with pytest.raises(ModelError, match=expected) as err:
        check_network(_spec(reference), _images())
    assert f"model {reference!r}" in str(err.value)


def test_googlenet_needs_aux_logits_off_to_train_and_the_check_says_so() -> None:
    # googlenet returns (logits, aux2, aux1) while training: the check catches it before any trial and names the fix
    with pytest.raises(ModelError, match=r"returns a value of type GoogLeNetOutputs in training mode .*set "
                                         r"model_args.aux_logits = false") as err:
        check_network(_spec("torchvision:googlenet", init_weights=False), _images())
    assert "model 'torchvision:googlenet'" in str(err.value)
    model = check_network(_spec("torchvision:googlenet", init_weights=False, aux_logits=False), _images())
    assert model.training and model(_images()).shape == (2, 10)


def test_a_users_model_is_checked_in_evaluation_mode_only_and_training_says_what_it_returned(
        models_py: Path) -> None:
    # The check must not look like training to the user's code; the training loop names what came back instead.
    reference = f"{models_py}:tuple_while_training"
    check_network(_spec(reference), _images())
    cfg = TrainConfig(model=reference, dataset="synthetic", synthetic_train=64, synthetic_val=16, synthetic_test=16,
                      batch_size=32, device="cpu")
    with pytest.raises(ModelError, match=rf"model {re.escape(repr(reference))} returns a value of type tuple in "
                                         r"training mode; the training loop needs the logits tensor only"):
        fit(cfg, 1)


def test_a_typo_in_the_factory_name_suggests_the_close_one(models_py: Path) -> None:
    with pytest.raises(ModelError, match=r"has no attribute 'biuld' \(its functions and classes: \[.*'build'.*\]; "
                                         r"did you mean 'build'\?\)") as err:
        build_network(_spec(f"{models_py}:biuld"))
    assert "'Path'" not in str(err.value) and "'nn'" not in str(err.value)  # what the file imports is not listed


def test_unknown_model_arg_for_a_factory_shows_the_signature(models_py: Path) -> None:
    with pytest.raises(ModelError, match=r"build\(num_classes, in_channels, dropout, \*\*model_args\)") as err:
        build_network(_spec(f"{models_py}:build", depth=3))
    assert "'depth'" in str(err.value)


def test_missing_or_broken_factory_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        build_network(_spec(f"{tmp_path / 'nope.py'}:build"))
    missing = r"module 'hpo_no_such_package.nets' is not importable \(No module named 'hpo_no_such_package'\)"
    with pytest.raises(ModelError, match=missing):
        build_network(_spec("hpo_no_such_package.nets:build"))
    broken = tmp_path / "broken.py"
    broken.write_text("import hpo_no_such_dependency\n")
    with pytest.raises(ModelError, match=f"importing {re.escape(str(broken))} raised ModuleNotFoundError"):
        build_network(_spec(f"{broken}:build"))
    assert not [name for name in sys.modules if name.endswith("_broken")]
