"""What the search side needs of each built-in objective to validate a study file, without importing the objective.

An objective's own module imports torch and, through the trial session, MLflow (about 1.8 s). `hpo status`,
`hpo best` and the other commands that only read results still validate the study file, which needs three
things of the objective: its settings model, the ``[space]`` names it can tune and the metrics it reports. They
live here, with nothing heavier than pydantic, and the objectives subclass them, so each is written once. The
entry point group ``hpo.objective_specs`` names them (``search.plugins.load_spec``).
"""

from __future__ import annotations

from objectives.settings import RUN_ONLY_KEYS, CustomConfig, TrainConfig

METRIC_KEYS = ("train_loss", "val_loss", "val_accuracy", "val_f1", "lr", "epoch_seconds", "images_per_second")


class CNNSpec:
    """The built-in CNN objective (``name = "cnn"``, objectives/objective.py)."""

    config_model = TrainConfig
    metrics = METRIC_KEYS  # what fit reports every epoch

    @classmethod
    def tunable_names(cls, config: TrainConfig) -> set[str] | None:
        """The TrainConfig fields a trial's value can depend on: not how trials run (the device, caches, ...), nor
        where the data is or the model's keyword table; another [space] name would change nothing, so is refused."""
        return set(TrainConfig.model_fields) - RUN_ONLY_KEYS - {"data_dir", "data_file", "model_args"}

    @classmethod
    def reported_metrics(cls, config: TrainConfig) -> tuple[str, ...]:
        return cls.metrics


class CustomSpec:
    """A user's own training function (``name = "custom"``, objectives/custom.py)."""

    config_model = CustomConfig

    @classmethod
    def tunable_names(cls, config: CustomConfig) -> set[str] | None:
        """Any ``[space]`` name: the function reads what it knows from config.params."""
        return None

    @classmethod
    def reported_metrics(cls, config: CustomConfig) -> tuple[str, ...]:
        return config.metrics
