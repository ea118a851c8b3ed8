"""Glue between the search machinery and the CNN training loop.

This is the only objectives module that knows Optuna exists (through ``search``): it samples the
parameters, builds a validated ``TrainConfig`` and hands ``fit`` the trial session's ``on_epoch`` hook.
The training loop itself stays free of Optuna and MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from objectives.data import DataSplits, load_data, unread_keys
from objectives.errors import BadDataError, DatasetNotFoundError, DeviceUnavailable, ModelError
from objectives.networks import build_network, check_network
from objectives.packed import SHARED_FIELDS, PackedFit, PackMember, unpackable
from objectives.runtime import resolve_runtime
from objectives.serving import data_record, load_classifier
from objectives.settings import RUN_ONLY_KEYS, TrainConfig
from objectives.spec import CNNSpec
from objectives.train import FitResult, evaluate, fit, spec_for
from search.checkpoint import load_checkpoint
from search.config import Settings
from search.errors import HpoError, first_line
from search.failures import is_out_of_memory
from search.session import StudyContext
from search.space import resolve, suggest


class DataError(HpoError):
    exit_code = 2


class CNNObjective(CNNSpec):
    """Train the configurable CNN with the sampled hyperparameters; value = the study metric. Its settings model,
    tunable names and metrics are ``CNNSpec``'s (objectives/spec.py)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.config: TrainConfig = settings.objective
        self.ctx: StudyContext | None = None

    @classmethod
    def neutral_keys(cls, config: TrainConfig) -> set[str]:
        """How trials run (device, compile, data placement, ...) and data keys this data set does not read."""
        return set(RUN_ONLY_KEYS) | unread_keys(config)

    def attach(self, ctx: StudyContext) -> None:
        """Give the objective the study's stores; done after prepare() so bad data creates nothing."""
        self.ctx = ctx
        ctx.tracker.log_data(ctx.parent_run_id, self.data().describe())

    def data(self) -> DataSplits:
        return load_data(self.config, resolve_runtime(self.config.device).device)

    def prepare(self) -> None:
        """Load the data and build the model once, before any trial and before any store exists, so missing or
        bad data and a model that does not fit the data fail fast with a clear message (exit 2)."""
        try:
            data = self.data()
            check_network(spec_for(self.config, data), data.inputs(data.train_x[:2]).cpu())
        except (DatasetNotFoundError, BadDataError, ModelError, DeviceUnavailable) as exc:
            raise DataError(str(exc)) from exc
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            why = first_line(exc)[:200]
            raise DataError(f"model {self.config.model!r} does not fit in memory for two images before any trial "
                            f"({why}); make it smaller (widths, model_args) or the images (image_size)") from exc

    def data_identity(self) -> dict[str, Any]:
        """The data beyond the settings (objectives/data.py ``DataSplits.identity``), in the study's fingerprint."""
        return self.data().identity()

    def describe(self) -> str:
        """One line for the start of a run: the data, where it lives, and the model; then a warning line when a
        trial's batch can be larger than the training split (it would run silently, one step an epoch)."""
        data = self.data()
        line = (f"data {data.name}: {len(data.train_y)} train / {len(data.val_y)} val / {len(data.test_y)} test "
                f"images, {data.num_classes} classes, {data.in_channels}x{data.image_size}x{data.image_size}; "
                f"on {'the device' if data.placement == 'device' else 'host memory, streamed'} "
                f"({data.placement_reason}); {self._model_words()}")
        small = self._batch_over(len(data.train_y))
        return f"{line}\n{small}" if small else line

    def _batch_over(self, train: int) -> str | None:
        """A warning when a trial's batch size (the setting, or the largest [space.batch_size] can sample) is more
        than the ``train`` images: that trial's batch is the whole split, so each epoch is one optimiser step."""
        spec = self.settings.space.params.get("batch_size")
        if spec is None:
            batch, what = self.config.batch_size, f"batch_size {self.config.batch_size}"
        else:
            values = spec.grid_values() or [spec.high]
            sizes = [int(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            if not sizes:
                return None
            batch = max(sizes)
            what = f"batch sizes up to {batch} ([space.batch_size])"
        if train >= batch:
            return None
        return (f"warning: the training split has {train} images, fewer than {what}: a trial whose batch size is "
                f"above {train} trains on the whole split as one batch, one optimiser step an epoch, so it learns "
                f"little. Add training images, or lower the batch size to {train} or less.")

    def _model_words(self) -> str:
        """The model and how its steps run: pool-first, compiled, CUDA graphs (or why they are not used here)."""
        cfg = self.config
        words = [f"model {cfg.model}" + (" (pool_first)" if cfg.model == "cnn" and cfg.pool_first else "")]
        if cfg.compile:
            words.append("compiled")
        if cfg.cuda_graphs:
            runtime = resolve_runtime(cfg.device)
            words.append("each training step one CUDA graph" if runtime.graphs(True)
                         else f"cuda_graphs ignored on {runtime.device.type} (steps run eagerly)")
        return ", ".join(words)

    def config_for(self, params: dict[str, Any]) -> TrainConfig:
        resolved = resolve(params, self.settings.space.lr_scaling, self.config.batch_size)
        return TrainConfig.model_validate({**self.config.model_dump(), **resolved})

    def __call__(self, trial: Any) -> float:
        if self.ctx is None:
            raise RuntimeError("attach(ctx) must be called before the objective runs trials")
        params = suggest(trial, self.settings.space)
        cfg = self.config_for(params)
        with self.ctx.trial(trial, params, cfg.model_dump(mode="json")) as session:
            result = fit(cfg, self.settings.study.max_epochs, session.on_epoch, resume=session.resume_training)
            return session.complete(checkpoint_record(cfg, result), model=result.model)

    def pack_key(self, params: dict[str, Any]) -> dict[str, Any] | str:
        """The sampled params that trials of one pack must share (batch size, architecture, ...), or why these
        cannot be packed (torchvision or the user's model, compile = true, cuda_graphs = true)."""
        reason = unpackable(self.config_for(params))
        if reason is not None:
            return reason
        return {name: value for name, value in params.items() if name in SHARED_FIELDS}

    def open_pack(self, params: dict[str, Any]) -> CNNPack:
        return CNNPack(self, self.config_for(params))

    def test_score(self, checkpoint_path: str) -> dict[str, float]:
        """Accuracy of a saved checkpoint on the held-out test split (used once, for the best trial)."""
        checkpoint = load_checkpoint(checkpoint_path)
        cfg = TrainConfig.model_validate(checkpoint["settings"])
        runtime = resolve_runtime(cfg.device)
        data = load_data(cfg, runtime.device)
        model = build_network(checkpoint["model_spec"], pretrained=False)
        model.load_state_dict(checkpoint["state_dict"])
        model.to(runtime.device)
        scores = evaluate(model, data.test_x, data.test_y, runtime, batch_size=cfg.eval_batch_size,
                          num_classes=data.num_classes, prepare=data.inputs)
        return {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"]}

    def load_model(self, checkpoint_path: str) -> tuple[Any, Any]:
        """(CPU model taking raw images, a few raw test images) for MLflow logging and `hpo export`."""
        try:
            return load_classifier(checkpoint_path)
        except DatasetNotFoundError as exc:
            raise DataError(str(exc)) from exc


def checkpoint_record(cfg: TrainConfig, result: FitResult) -> dict[str, Any]:
    """A trial's checkpoint without its weights (the session adds those): the same for packed trials."""
    return {"model_spec": result.spec, "settings": cfg.model_dump(mode="json"), "data": data_record(result.data)}


class CNNPack:
    """Trials of the CNN objective trained together (``objectives.packed.PackedFit``), keyed by trial number:
    what ``search.packing.PackRunner`` drives."""

    def __init__(self, objective: CNNObjective, cfg: TrainConfig) -> None:
        self.objective = objective
        self.fit = PackedFit(cfg, objective.settings.study.max_epochs)
        self.done: dict[int, PackMember] = {}

    def __len__(self) -> int:
        return len(self.fit)

    def resolved(self, params: dict[str, Any]) -> dict[str, Any]:
        return self.objective.config_for(params).model_dump(mode="json")

    def add(self, key: int, params: dict[str, Any], on_epoch: Callable[..., bool],
            resume: dict[str, Any] | None) -> None:
        self.fit.add(self.objective.config_for(params), on_epoch, resume, key=key)

    def run_epoch(self) -> list[tuple[int, Exception | None]]:
        left = self.fit.run_epoch()
        self.done.update({m.key: m for m in left if m.error is None})
        return [(m.key, m.error) for m in left]

    def remove(self, key: int) -> None:
        self.fit.remove(key)

    def take(self, key: int) -> tuple[dict[str, Any], Any]:
        member = self.done.pop(key)
        result = self.fit.result(member)
        return checkpoint_record(member.cfg, result), result.model
