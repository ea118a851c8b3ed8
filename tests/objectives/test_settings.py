import sys

import pytest
from pydantic import ValidationError

from objectives.settings import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_every_field_has_a_default() -> None:
    cfg = TrainConfig()
    assert cfg.dataset == "digits"
    assert cfg.widths == (32, 64)
    assert cfg.lr == 1e-3 and cfg.batch_size == 64 and cfg.optimizer == "adamw"
    assert cfg.schedule == "cosine" and cfg.device == "auto" and cfg.verify_checksums is True
    assert cfg.crop_padding is None and cfg.flip is None


def test_toml_section_with_lists_becomes_tuples() -> None:
    section = tomllib.loads(
        """
        dataset = "synthetic"
        widths = [16, 32, 64]
        synthetic_shape = [1, 8, 8]
        val_size = 5000
        lr = 0.05
        """
    )
    cfg = TrainConfig(**section)
    assert cfg.widths == (16, 32, 64)
    assert cfg.synthetic_shape == (1, 8, 8)
    assert cfg.val_size == 5000 and isinstance(cfg.val_size, int)
    assert TrainConfig(val_size=0.25).val_size == 0.25


def test_unknown_key_is_rejected() -> None:
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainConfig(learning_rate=0.1)


def test_frozen() -> None:
    cfg = TrainConfig()
    with pytest.raises(ValidationError):
        cfg.lr = 0.1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", 0.0, "greater than 0"),
        ("batch_size", 0, "greater than or equal to 1"),
        ("dropout", 1.0, "less than 1"),
        ("widths", [], "at least 1"),
        ("widths", [32, 0], "greater than or equal to 1"),
        ("val_size", 1.5, "fraction must be in"),
        ("val_size", 0, "count must be >= 1"),
        ("val_size", True, "fraction in"),
        ("dataset", "imagenet", "digits"),
        ("schedule", "linear", "cosine"),
        ("synthetic_shape", [3, 32, 16], "size, size"),
        ("grad_clip", 0.0, "greater than 0"),
        ("label_smoothing", 1.0, "less than 1"),
        ("momentum", 1.0, "less than 1"),
        ("gamma", 1.5, "less than or equal to 1"),
        ("eval_batch_size", 0, "greater than or equal to 1"),
        ("train_subset", 0, "greater than or equal to 1"),
    ],
)
def test_bad_values_are_rejected_with_field_and_reason(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig(**{field: value})
    text = str(info.value)
    assert field in text
    assert message in text


def test_nesterov_without_momentum_is_explained() -> None:
    with pytest.raises(ValidationError, match="nesterov = true needs momentum > 0"):
        TrainConfig(optimizer="sgd", momentum=0.0)
    assert TrainConfig(optimizer="sgd", momentum=0.0, nesterov=False).momentum == 0.0


def test_built_in_cnn_keys_with_another_model_are_refused_not_ignored() -> None:
    """A copied study file keeps widths = [64, 128]; with model = 'my_models.py:build' they would do nothing."""
    with pytest.raises(ValidationError, match=r"widths, activation: read by the built-in model = 'cnn' only, not "
                                              r"'torchvision:resnet18'; remove them"):
        TrainConfig(model="torchvision:resnet18", widths=(64, 128), activation="gelu")
    mine = TrainConfig(model="torchvision:resnet18", widths=(32, 64))  # the default: nothing is lost
    assert TrainConfig(**mine.model_dump()).model == "torchvision:resnet18"  # a stored config validates again
