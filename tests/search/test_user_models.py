"""A user's images and model through `hpo run`: bad data and bad models refused before anything is created,
a factory from a file and from a package, arrays, and (slow) a torchvision ResNet-18 on an image folder
checked through Optuna, MLflow, the checkpoint and `hpo export`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from optuna_dashboard import get_note

from objectives.data import clear_data_cache
from search.cli import main
from tests.images import class_image, make_arrays, make_image_folder

STUDY = """
[study]
name = "{name}"
n_trials = {trials}
max_epochs = {epochs}

[sampler]
name = "random"
seed = 0

[pruner]
name = "none"

[space.lr]
type = "float"
low = 0.003
high = 0.03
log = true

[space.dropout]
type = "float"
low = 0.0
high = 0.3

[objective]
name = "cnn"
cache_dir = "cache"
batch_size = 16
device = "cpu"
{objective}
"""

FACTORY = '''
from torch import nn


def build(num_classes, in_channels, dropout, hidden=8):
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))


def wrong_shape(num_classes, in_channels, dropout):
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes + 2))


def not_a_module(num_classes, in_channels, dropout):
    return "a string"


def raises(num_classes, in_channels, dropout):
    raise RuntimeError("the factory broke")


class Training(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    def forward(self, x):
        if self.training:  # the check before the first trial runs a user's model in evaluation mode only
            raise ValueError("the training path broke")
        return self.head(x)


def breaks_in_training(num_classes, in_channels, dropout):
    return Training(num_classes)


def lazy(num_classes, in_channels, dropout):
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(dropout),
                         nn.LazyLinear(num_classes))
'''


@pytest.fixture(autouse=True)
def fresh_data() -> None:
    clear_data_cache()


def study_file(folder: Path, objective: str, name: str = "mine", trials: int = 2, epochs: int = 2) -> Path:
    path = folder / "study.toml"
    path.write_text(STUDY.format(name=name, trials=trials, epochs=epochs, objective=textwrap.dedent(objective)))
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def images(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "pets", per_class=10, size=(20, 16))


@pytest.mark.parametrize(
    ("objective", "needles"),
    [
        ('dataset = "folder"\ndata_dir = "nowhere"', ["nowhere", "does not exist"]),
        ('dataset = "folder"\ndata_dir = "pets"\nmodel = "missing.py:build"', ["missing.py", "model"]),
        ('dataset = "folder"\ndata_dir = "pets"\nmodel = "models.py:wrong_shape"', ["(2, 5)", "(2, 3)"]),
        ('dataset = "folder"\ndata_dir = "pets"\nmodel = "models.py:not_a_module"', ["models.py:not_a_module", "str"]),
        ('dataset = "folder"\ndata_dir = "pets"\nmodel = "models.py:raises"', ["the factory broke"]),
        ('dataset = "folder"\ndata_dir = "pets"\nmodel = "models.py:nothing_here"', ["nothing_here"]),
        ('dataset = "folder"\ndata_dir = "pets"\nmodel = "torchvision:resnet19"', ["resnet19", "resnet18"]),
        ('dataset = "folder"\ndata_dir = "broken"', ["broken/b/bad.png", "skip_bad_images = true"]),
        ('dataset = "arrays"\ndata_file = "bad.npz"', ["bad.npz", "needs x_train and y_train"]),
    ],
    ids=["no-data-dir", "no-model-file", "wrong-shape", "not-a-module", "factory-raises", "no-attribute",
         "unknown-torchvision", "corrupt-image", "npz-keys"],
)
def test_bad_data_or_model_is_refused_before_anything_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], objective: str, needles: list[str]
) -> None:
    images(tmp_path)
    (tmp_path / "models.py").write_text(FACTORY)
    broken = make_image_folder(tmp_path / "broken", per_class=4, classes=("a", "b"))
    (broken / "b" / "bad.png").write_bytes(b"\x89PNG not really")
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 8, 8), np.uint8))
    code, _, err = run(capsys, "run", str(study_file(tmp_path, objective)), "--run-dir", str(tmp_path / "runs"))
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "runs").exists()


def test_factory_from_a_file_and_from_a_package(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    images(tmp_path)
    (tmp_path / "models.py").write_text(FACTORY)
    objective = 'dataset = "folder"\ndata_dir = "pets"\nimage_size = 12\nmodel = "models.py:build"\n' \
                '[objective.model_args]\nhidden = 6'
    code, _, err = run(capsys, "run", str(study_file(tmp_path, objective)), "--run-dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "model " + str(tmp_path.resolve() / "models.py") + ":build" in err  # the run's data/model line
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'runs/mine/optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    checkpoint = torch.load(study.best_trial.user_attrs["checkpoint"], weights_only=True)
    assert checkpoint["model_spec"]["model_args"] == {"hidden": 6}
    assert checkpoint["state_dict"]["0.weight"].shape == (6, 3, 3, 3)
    assert checkpoint["data"]["class_names"] == ["cat", "dog", "fox"]

    package = tmp_path / "pkg" / "zoo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    other = tmp_path / "other"
    other.mkdir()
    images(other)
    objective = 'dataset = "folder"\ndata_dir = "pets"\nimage_size = 12\nmodel = "zoo.nets:build"'
    code, _, err = run(capsys, "run", str(study_file(other, objective, name="pkg")), "--run-dir", str(tmp_path / "r2"))
    assert code == 0, err
    study = optuna.load_study(study_name="pkg", storage=f"sqlite:///{tmp_path / 'r2/pkg/optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2


def test_a_model_with_lazy_layers_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """nn.LazyLinear sizes itself on its first input: each trial's model gets it before the optimiser is made (all
    its trials failed with "uninitialized parameter")."""
    images(tmp_path)
    (tmp_path / "models.py").write_text(FACTORY)
    objective = 'dataset = "folder"\ndata_dir = "pets"\nimage_size = 12\nmodel = "models.py:lazy"'
    code, _, err = run(capsys, "run", str(study_file(tmp_path, objective)), "--run-dir", str(tmp_path / "runs"))
    assert code == 0, err
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'runs/mine/optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    weights = torch.load(study.best_trial.user_attrs["checkpoint"], weights_only=True)["state_dict"]
    assert weights["4.weight"].shape == (3, 4 * 10 * 10)  # 3 classes from 4 maps of 10x10 (12x12, 3x3 kernel)
    code, _, err = run(capsys, "best", str(study_file(tmp_path, objective)), "--run-dir", str(tmp_path / "runs"))
    assert code == 0, err


def test_a_model_that_fails_in_training_shows_its_traceback_once_and_keeps_each_in_mlflow(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A one-line reason does not debug a model: the first failed trial's traceback goes to stderr, every failed
    trial's to error.txt in its MLflow run, where it was raised to the trial's record and the stop message."""
    images(tmp_path)
    (tmp_path / "models.py").write_text(FACTORY)
    line = FACTORY.splitlines().index('            raise ValueError("the training path broke")') + 1
    objective = 'dataset = "folder"\ndata_dir = "pets"\nimage_size = 12\nmodel = "models.py:breaks_in_training"'
    code, _, err = run(capsys, "run", str(study_file(tmp_path, objective)), "--run-dir", str(tmp_path / "runs"),
                       "--set", "study.max_failures=2")
    assert code == 1, err
    site = f"{tmp_path.resolve() / 'models.py'} line {line}, in forward"
    assert err.count("Traceback (most recent call last)") == 1 and f'File "{tmp_path.resolve() / "models.py"}", ' \
        f"line {line}, in forward" in err, err
    assert f"the last one failed with ValueError: the training path broke (at {site})" in err
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'runs/mine/optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs/mine/mlflow.db'}")
    for trial in study.trials:
        assert trial.user_attrs["reason"] == "error: ValueError: the training path broke"
        assert trial.user_attrs["error_at"] == site
        run_id = trial.user_attrs["mlflow_run_id"]
        assert client.get_run(run_id).data.tags["hpo.error_at"] == site
        text = Path(client.download_artifacts(run_id, "error.txt", str(tmp_path / f"dl{trial.number}"))).read_text()
        assert text.startswith("Traceback") and "ValueError: the training path broke" in text
        assert f'File "{tmp_path.resolve() / "models.py"}", line {line}, in forward' in text
        note = get_note(optuna.trial.Trial(study, trial._trial_id))  # the dashboard's note says where, too
        assert f"**Raised at `{site}`**; the traceback is `error.txt` in its MLflow run" in note


def test_arrays_study_records_class_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arrays = make_arrays(n_train=45, layout="NHWC")
    np.savez(tmp_path / "data.npz", **arrays, classes=np.array(["red", "green", "blue"]))
    objective = 'dataset = "arrays"\ndata_file = "data.npz"\nval_size = 9'
    code, _, err = run(capsys, "run", str(study_file(tmp_path, objective)), "--run-dir", str(tmp_path / "runs"))
    assert code == 0, err
    assert "data arrays: 36 train / 9 val / 15 test images, 3 classes, 3x12x12" in err
    study = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'runs/mine/optuna.db'}")
    checkpoint = torch.load(study.best_trial.user_attrs["checkpoint"], weights_only=True)
    assert checkpoint["data"]["class_names"] == ["red", "green", "blue"]
    assert checkpoint["data"]["example"].shape == (5, 3, 12, 12)


@pytest.mark.slow
def test_resnet18_on_an_image_folder_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The main user path: a folder of PNGs, torchvision's ResNet-18 at 32x32, a short study, then export."""
    make_image_folder(tmp_path / "pets", per_class=16, size=(40, 36), layout="split", splits={"train": 12, "val": 4})
    objective = '''
        dataset = "folder"
        data_dir = "pets"
        image_size = 32
        test_size = 0.25
        model = "torchvision:resnet18"
        [objective.model_args]
        small_input = true
        zero_init_residual = true
    '''
    study_path = study_file(tmp_path, objective, name="pets", trials=3, epochs=2)
    runs = tmp_path / "runs"
    code, _, err = run(capsys, "run", str(study_path), "--run-dir", str(runs))
    assert code == 0, err
    assert "data folder: 27 train / 12 val / 9 test images, 3 classes, 3x32x32; on the device" in err
    root = runs / "pets"
    study = optuna.load_study(study_name="pets", storage=f"sqlite:///{root / 'optuna.db'}")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pets")
    runs_found = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs_found if r.data.tags.get("hpo.role") == "study")
    children = [r for r in runs_found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    assert parent.data.tags["hpo.data.class_names"] == "cat,dog,fox"
    assert parent.data.tags["hpo.data.placement"] == "device"
    data_json = json.loads(Path(client.download_artifacts(parent.info.run_id, "data.json", str(tmp_path))).read_text())
    assert data_json["class_names"] == ["cat", "dog", "fox"] and data_json["train_images"] == 27
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_accuracy")] == [0, 1]
        assert child.data.params["config.model"] == "torchvision:resnet18"

    best = study.best_trial
    checkpoint = torch.load(best.user_attrs["checkpoint"], weights_only=True)
    assert checkpoint["model_spec"]["model"] == "torchvision:resnet18"
    assert checkpoint["model_spec"]["class_names"] == ["cat", "dog", "fox"]
    assert checkpoint["state_dict"]["conv1.weight"].shape == (64, 3, 3, 3)  # the small-input stem
    assert "fc.1.weight" in checkpoint["state_dict"]  # dropout before the final layer

    out = tmp_path / "exported"
    assert main(["export", str(study_path), "--run-dir", str(runs), "--out", str(out)]) == 0
    served = mlflow.pyfunc.load_model(str(out))
    names = served.metadata.metadata["class_names"]
    assert names == ["cat", "dog", "fox"]
    pictures = np.stack([class_image(label, 500 + i, (32, 32)).transpose(2, 0, 1) for label in range(3)
                         for i in range(2)]).astype(np.float32)
    predicted = served.predict(pictures)
    assert predicted.shape == (6,) and set(predicted.tolist()) <= {0, 1, 2}
    assert [names[i] for i in predicted] and all(isinstance(names[i], str) for i in predicted)


def test_a_folder_model_exported_predicts_image_files_prepared_as_the_readme_and_its_metadata_say(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The path after tuning: `hpo best`, `hpo export`, then predict on the files a user has. The export says
    what the input must be (pixels 0..255, not 0..1; how a file is resized and cropped), and the README's
    `prepare` turns a file into exactly the pixels training saw, so predictions match the test score."""
    import re

    from objectives.data import load_data
    from objectives.image_folder import decode_image
    from search.config import load_settings

    make_image_folder(tmp_path / "pets", per_class=12, size=(24, 20), ext="jpg")  # not square: cropped
    study_path = study_file(tmp_path, 'dataset = "folder"\ndata_dir = "pets"\nimage_size = 12', name="pets")
    opts = [str(study_path), "--run-dir", str(tmp_path / "runs")]
    assert run(capsys, "run", *opts)[0] == 0
    code, out, err = run(capsys, "best", *opts, "--json")
    assert code == 0, err
    reported = json.loads(out)["test_metrics"]["test_accuracy"]
    model_dir = tmp_path / "best-model"
    code, out, err = run(capsys, "export", *opts, "--out", str(model_dir))
    assert code == 0, err
    assert "input:       float32 images (N, 3, 12, 12), pixel values 0..255 (not 0..1)" in out, out
    assert "image files: as in training: open with Pillow, apply the EXIF orientation, convert to RGB, resize " \
           "the shorter side to 12 (bilinear), center-crop 12x12" in out, out

    served = mlflow.pyfunc.load_model(str(model_dir))
    meta = served.metadata.metadata
    assert meta["class_names"] == ["cat", "dog", "fox"]
    assert "0..255 (not 0..1)" in meta["input"] and "center-crop 12x12" in meta["image_files"]
    data = load_data(load_settings(study_path).objective, torch.device("cpu"))
    test_x, test_y = data.test_x.float().numpy(), data.test_y.numpy()
    assert (served.predict(test_x) == test_y).mean() == pytest.approx(reported)

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "def prepare(" in b)
    namespace: dict = {}
    exec(block[: block.index("model = mlflow")], namespace)  # the README's prepare(), as a user copies it
    files = sorted((tmp_path / "pets").glob("*/*.jpg"))
    prepared = np.stack([namespace["prepare"](f, 12, "RGB") for f in files])
    np.testing.assert_array_equal(prepared, np.stack([decode_image(f, 12, 3) for f in files]).astype(np.float32))
    names = meta["class_names"]
    predicted = [names[i] for i in served.predict(prepared)]
    decoded = np.stack([decode_image(f, 12, 3) for f in files]).astype(np.float32)
    assert predicted == [names[i] for i in served.predict(decoded)]
    module = mlflow.pytorch.load_model(str(model_dir))  # the torch module: uint8 too, at the same scale
    with torch.no_grad():
        as_uint8 = module(torch.from_numpy(decoded.astype(np.uint8))).numpy()
        with pytest.raises(RuntimeError, match="expected scalar type Double but found Float"):
            module(torch.from_numpy(decoded.astype(np.float64)))
        with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[2\] == 12"):
            module(torch.zeros(1, 3, 16, 16))
    np.testing.assert_array_equal(as_uint8, served.predict(decoded))
