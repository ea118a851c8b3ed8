"""The quickstart search written by hand, the way Optuna's PyTorch example would have a person write it.

This is the baseline `bench/vs_handwritten.py` runs against `hpo run studies/quickstart.toml`: a plain
Optuna script with a torch DataLoader over TensorDatasets, a CNN, AdamW with a cosine schedule,
`trial.report` + `trial.should_prune()` under a MedianPruner, TPE, and one nested MLflow run per trial with
`log_metric` per epoch (as in the Optuna + MLflow examples). It deliberately has none of hpo's machinery:
no early stopping inside a trial, no checkpoints, no resume. Only the data split and the network come from
this project, so both sides train the same images with the same architecture:

* data: `objectives.data.load_data` with the quickstart's objective settings gives the identical digits
  split; the script takes it to float CPU tensors and normalises them itself with the training set's
  mean and std;
* model: `objectives.networks.build_network` with the quickstart's widths (32, 64).

The four hyperparameters, their ranges, the sampler and the pruner options are written out here as a
person would copy them from studies/quickstart.toml; `vs_handwritten.py` checks they still match it.

    python bench/handwritten_study.py --trials 12 --epochs 20 --seed 42 --out /tmp/handwritten

Writes OUT/optuna.db (the study, which the bench reads) and OUT/mlflow.db (the runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlflow
import optuna
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from objectives.data import load_data  # noqa: E402
from objectives.networks import build_network, network_spec  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402

# The quickstart's search, copied from studies/quickstart.toml.
LR = (1e-3, 3e-2)  # log scale
BATCH_SIZES = [32, 64, 128]
WEIGHT_DECAY = (1e-6, 1e-2)  # log scale
DROPOUT = (0.0, 0.5)
TPE_STARTUP_TRIALS = 4
PRUNER_OPTIONS = {"n_startup_trials": 3, "n_warmup_steps": 2, "interval_steps": 1}
# The quickstart's [objective] keys that decide the data split and the network.
OBJECTIVE = {"dataset": "digits", "val_size": 0.2, "test_size": 0.2, "widths": (32, 64), "augment": False}

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_datasets() -> tuple[TensorDataset, TensorDataset]:
    """The quickstart's train and validation split as normalised float tensors on the CPU."""
    data = load_data(TrainConfig(**OBJECTIVE, device="cpu"), torch.device("cpu"))
    x_train = data.train_x.float()
    mean, std = x_train.mean(), x_train.std()  # digits have one channel
    x_val = (data.val_x.float() - mean) / std
    return TensorDataset((x_train - mean) / std, data.train_y.cpu()), TensorDataset(x_val, data.val_y.cpu())


def define_model(dropout: float) -> nn.Module:
    """The quickstart's CNN (conv-BN-ReLU stages of 32 and 64 channels, global pooling, dropout, linear)."""
    cfg = TrainConfig(**OBJECTIVE, dropout=dropout, device="cpu")
    spec = network_spec(cfg, num_classes=10, in_channels=1, image_size=8, class_names=[str(i) for i in range(10)])
    return build_network(spec)


def objective(trial: optuna.Trial, train_set: TensorDataset, val_set: TensorDataset, epochs: int) -> float:
    lr = trial.suggest_float("lr", *LR, log=True)
    batch_size = trial.suggest_categorical("batch_size", BATCH_SIZES)
    weight_decay = trial.suggest_float("weight_decay", *WEIGHT_DECAY, log=True)
    dropout = trial.suggest_float("dropout", *DROPOUT)

    model = define_model(dropout).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=1024)

    with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True):
        mlflow.log_params(trial.params)
        accuracy = 0.0
        for epoch in range(epochs):
            model.train()
            train_loss = 0.0
            for x, y in train_loader:
                x, y = x.to(DEVICE), y.to(DEVICE)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                train_loss += loss.item() * len(y)
            scheduler.step()

            model.eval()
            correct, val_loss = 0, 0.0
            with torch.no_grad():
                for x, y in val_loader:
                    x, y = x.to(DEVICE), y.to(DEVICE)
                    logits = model(x)
                    val_loss += F.cross_entropy(logits, y, reduction="sum").item()
                    correct += (logits.argmax(dim=1) == y).sum().item()
            accuracy = correct / len(val_set)

            mlflow.log_metric("train_loss", train_loss / len(train_set), step=epoch)
            mlflow.log_metric("val_loss", val_loss / len(val_set), step=epoch)
            mlflow.log_metric("val_accuracy", accuracy, step=epoch)
            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("handwritten-study"))
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite file OUT/optuna.db)")
    args = parser.parse_args()

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    train_set, val_set = load_datasets()

    mlflow.set_tracking_uri(f"sqlite:///{(args.out / 'mlflow.db').resolve()}")
    mlflow.set_experiment("handwritten-digits")
    study = optuna.create_study(
        study_name=f"handwritten-seed{args.seed}",
        storage=args.storage or f"sqlite:///{(args.out / 'optuna.db').resolve()}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=TPE_STARTUP_TRIALS),
        pruner=optuna.pruners.MedianPruner(**PRUNER_OPTIONS),
        load_if_exists=False,
    )
    with mlflow.start_run(run_name=f"study-seed{args.seed}"):
        study.optimize(lambda t: objective(t, train_set, val_set, args.epochs), n_trials=args.trials)

    states = [t.state.name for t in study.trials]
    epochs = sum(len(t.intermediate_values) for t in study.trials)
    print(f"{len(states)} trials ({states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned), "
          f"{epochs} epochs, {time.perf_counter() - start:.1f} s; best val_accuracy {study.best_value:.4f} "
          f"(trial {study.best_trial.number}, params {study.best_params})")


if __name__ == "__main__":
    main()
