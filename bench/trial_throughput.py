"""Images per second of one trial: the project's training loop against a hand-written PyTorch loop.

The hand-written loop is what a user writes around Optuna by hand: a ``DataLoader`` over a ``Dataset``
that augments one image at a time in ``__getitem__`` (torchvision's RandomCrop with padding, plus
RandomHorizontalFlip where the data set allows it), a ``.to(device)`` per batch, an ``.item()`` per batch
for the loss, and a validation pass each epoch. Both loops train the same model (objectives.model), on the
same normalised tensors, with the same batch size, optimiser (AdamW), cosine schedule and number of
epochs, in one process, alternating which goes first, several repeats. Printed: images per second for each
(training images x epochs / wall time of the whole run, validation included), and their ratio, as
medians over the repeats; plus the machine.

On CUDA (``--device auto`` with a GPU) the same comparison runs on the GPU, then a GPU section measures the
default CIFAR-10 CNN on synthetic CIFAR-shaped data of the real size (45k/5k): seconds per epoch, images
per second and peak memory with torch.compile off and on (compile time and the epochs it takes to pay for
itself), and the aggregate throughput of 1, 2 and 4 concurrent trials (processes) on one GPU.

    python bench/trial_throughput.py                       # CPU: digits and synthetic CIFAR-shaped
    python bench/trial_throughput.py --repeats 7 --epochs 3
    python bench/trial_throughput.py --gpu-only            # on a GPU machine: just the GPU section
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from objectives.augment import default_crop_padding  # noqa: E402
from objectives.data import DataSplits, load_data  # noqa: E402
from objectives.networks import build_network  # noqa: E402
from objectives.runtime import resolve_runtime  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import fit, spec_for  # noqa: E402


def machine() -> dict[str, Any]:
    """What the figures were measured on, printed with them."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


# --- the hand-written baseline --------------------------------------------------------------------------------


class AugmentedImages(Dataset):
    """Per-sample augmentation in ``__getitem__``, the way torchvision examples do it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, padding: int, flip: bool) -> None:
        from torchvision.transforms import v2

        self.x, self.y = x, y
        steps: list[nn.Module] = [v2.RandomCrop(x.shape[-1], padding=padding)] if padding else []
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps) if steps else None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        return (self.transform(img) if self.transform else img), self.y[i]


def handwritten_fit(cfg: TrainConfig, data: DataSplits, epochs: int, device: torch.device, workers: int) -> float:
    """A plain training script: DataLoader, per-batch .to(device) and .item(); returns the last val accuracy."""
    torch.manual_seed(cfg.seed)
    cpu = lambda t: t.to("cpu")  # noqa: E731 - the hand-written script keeps its data set on the CPU
    padding = cfg.crop_padding if cfg.crop_padding is not None else default_crop_padding(data.image_size)
    flip = cfg.flip if cfg.flip is not None else data.flip_ok
    train = AugmentedImages(cpu(data.inputs(data.train_x)), cpu(data.train_y), padding if cfg.augment else 0,
                            flip and cfg.augment)  # normalised once up front (the data set stores raw images)
    pin = device.type == "cuda"
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
                        persistent_workers=workers > 0)
    val = TensorDataset(cpu(data.inputs(data.val_x)), cpu(data.val_y))
    val_loader = DataLoader(val, batch_size=cfg.eval_batch_size,
                            pin_memory=pin)
    model = build_network(spec_for(cfg, data)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    accuracy = 0.0
    for _ in range(epochs):
        model.train()
        running = 0.0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running += loss.item() * len(y)
        scheduler.step()
        model.eval()
        correct, total = 0, 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device), y.to(device)
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
        accuracy = correct / total
    return accuracy


# --- measurement ----------------------------------------------------------------------------------------------


def timed(run: Callable[[], Any]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare_loops(label: str, cfg: TrainConfig, epochs: int, repeats: int, workers: int) -> dict[str, Any]:
    """Alternate the two loops ``repeats`` times; medians of images/s and of the per-repeat ratio."""
    device = resolve_runtime(cfg.device).device
    data = load_data(cfg, device)
    images = len(data.train_y) * epochs
    project = lambda: fit(cfg, epochs)  # noqa: E731
    baseline = lambda: handwritten_fit(cfg, data, epochs, device, workers)  # noqa: E731
    fit(cfg, 1)  # warm-up: first-call allocations, cudnn autotuning, lazy imports
    handwritten_fit(cfg, data, 1, device, workers)
    ours, theirs = [], []
    for r in range(repeats):
        order = [("project", project), ("handwritten", baseline)]
        for name, run in order if r % 2 == 0 else order[::-1]:
            (ours if name == "project" else theirs).append(images / timed(run))
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    result = {"label": label, "device": str(device), "train_images": len(data.train_y), "epochs": epochs,
              "batch_size": cfg.batch_size, "repeats": repeats, "dataloader_workers": workers,
              "project_images_per_s": statistics.median(ours), "handwritten_images_per_s": statistics.median(theirs),
              "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    print(f"{label:<28} {device.type:<5} bs {cfg.batch_size:<4} project {result['project_images_per_s']:>9.0f} img/s"
          f"   hand-written {result['handwritten_images_per_s']:>9.0f} img/s   ratio {result['ratio_median']:.2f}x"
          f" (range {result['ratio_min']:.2f}-{result['ratio_max']:.2f}, {repeats} repeats)", flush=True)
    return result


def cpu_configs(args: argparse.Namespace) -> list[tuple[str, TrainConfig]]:
    from search.config import load_settings

    quick = load_settings(REPO / "studies" / "quickstart.toml").objective
    out = []
    for bs in args.batch_sizes:
        out.append(("digits (quickstart CNN)", quick.model_copy(update={"batch_size": bs, "device": args.device})))
    for bs in args.batch_sizes:
        out.append(("synthetic 3x32x32", TrainConfig(
            dataset="synthetic", synthetic_shape=(3, 32, 32), synthetic_train=args.synthetic_train,
            synthetic_val=max(100, args.synthetic_train // 10), synthetic_test=100, widths=tuple(args.widths),
            batch_size=bs, device=args.device, lr=1e-3)))
    return out


# --- GPU section ----------------------------------------------------------------------------------------------


def cifar_shaped(batch_size: int, compile_: bool = False, device: str = "cuda", n_train: int = 45000) -> TrainConfig:
    """The shipped CIFAR-10 study's objective on synthetic data of CIFAR-10's size (no download on the GPU box)."""
    from bench.cifar_synthetic import cifar_synthetic

    return cifar_synthetic(n_train, max(100, n_train // 9), max(100, n_train * 2 // 9), batch_size=batch_size,
                           lr=0.1 * batch_size / 256, compile=compile_, device=device)


def epoch_times(cfg: TrainConfig, epochs: int) -> dict[str, Any]:
    cuda = cfg.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = fit(cfg, epochs)
    total = time.perf_counter() - start
    seconds = [h["epoch_seconds"] for h in result.history]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {"first_epoch_s": seconds[0], "steady_epoch_s": steady, "total_s": total,
            "images_per_s": statistics.median(h["images_per_second"] for h in result.history[1:] or result.history),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else math.nan,
            "val_accuracy": result.history[-1]["val_accuracy"]}


def _concurrent_worker(cfg_json: str, epochs: int, barrier: Any, queue: Any) -> None:
    cfg = TrainConfig.model_validate_json(cfg_json)
    load_data(cfg, torch.device(cfg.device))  # each process holds its own copy on the GPU, as parallel trials do
    fit(cfg, 1)  # warm-up outside the timed window
    barrier.wait()
    start = time.perf_counter()
    result = fit(cfg, epochs)
    if cfg.device == "cuda":
        torch.cuda.synchronize()
    queue.put((time.perf_counter() - start, len(result.data.train_y) * epochs, start))


def concurrent_trials(cfg: TrainConfig, n: int, epochs: int) -> dict[str, Any]:
    """Aggregate images/s of ``n`` trial processes training at once on one GPU (what --trials-per-gpu does)."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_concurrent_worker, args=(cfg.model_dump_json(), epochs, barrier, queue))
             for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    first_start = min(r[2] for r in results)
    wall = max(r[2] + r[0] for r in results) - first_start
    return {"trials": n, "aggregate_images_per_s": sum(r[1] for r in results) / wall,
            "per_trial_images_per_s": statistics.median(r[1] / r[0] for r in results), "wall_s": wall}


def gpu_section(args: argparse.Namespace, device: str = "cuda", n_train: int = 45000) -> dict[str, Any]:
    """Seconds per epoch, images/s, memory, torch.compile off/on, 1/2/4 concurrent trials (``device`` "cpu"
    only to check this code path on a machine without a GPU: its figures mean nothing)."""
    out: dict[str, Any] = {"compile": {}, "concurrent": []}
    bs = args.gpu_batch_size

    def cfg(compile_: bool = False) -> TrainConfig:
        return cifar_shaped(bs, compile_, device, n_train)

    load_data(cfg(), torch.device(device))
    # compile "on" twice: the second trial in a process finds Inductor's caches warm (what later trials pay)
    modes = (("off", False), ("on", True), ("on_second_trial", True)) if args.compile else (("off", False),)
    for key, compile_ in modes:
        r = epoch_times(cfg(compile_), args.gpu_epochs)
        out["compile"][key] = r
        print(f"cifar-shaped {n_train}, bs {bs}, compile {key:<15}: first epoch {r['first_epoch_s']:.2f} s, steady "
              f"{r['steady_epoch_s']:.3f} s/epoch, {r['images_per_s']:.0f} img/s, peak "
              f"{r['peak_memory_gib']:.2f} GiB, val acc {r['val_accuracy']:.3f}", flush=True)
    off = out["compile"]["off"]
    saving = off["steady_epoch_s"] - out["compile"]["on"]["steady_epoch_s"] if args.compile else 0.0
    for key in ("on", "on_second_trial") if args.compile else ():
        overhead = out["compile"][key]["first_epoch_s"] - off["first_epoch_s"]
        even = 0.0 if overhead <= 0 else overhead / saving if saving > 0 else math.inf
        out["compile"][f"break_even_epochs_{key}"] = even
        verdict = f"pays for itself after {even:.1f} epochs" if math.isfinite(even) else "never pays"
        print(f"torch.compile ({key}): {overhead:+.1f} s on the first epoch, {saving * 1000:+.0f} ms per later epoch"
              f" -> {verdict}", flush=True)
    for n in (1, 2, 4):
        r = concurrent_trials(cfg(), n, args.gpu_epochs)
        out["concurrent"].append(r)
        print(f"{n} concurrent trial(s): aggregate {r['aggregate_images_per_s']:.0f} img/s, per trial "
              f"{r['per_trial_images_per_s']:.0f} img/s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3, help="epochs per measured run (default 3)")
    p.add_argument("--repeats", type=int, default=5, help="alternating repeats per configuration (default 5)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64], metavar="B")
    p.add_argument("--synthetic-train", type=int, default=5000, help="synthetic training images on the CPU")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64], help="CNN widths for the synthetic set")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the hand-written loop")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--gpu-only", action="store_true", help="skip the loop comparison, run the GPU section")
    p.add_argument("--gpu-batch-size", type=int, default=512)
    p.add_argument("--gpu-epochs", type=int, default=4)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="GPU section: skip torch.compile")
    p.add_argument("--gpu-section-on-cpu", action="store_true",
                   help="run the GPU section's code on the CPU with --synthetic-train images (a check, not figures)")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:], "loops": []}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), flush=True)
    if not args.gpu_only:
        for label, cfg in cpu_configs(args):
            report["loops"].append(compare_loops(label, cfg, args.epochs, args.repeats, args.workers))
    if args.gpu_section_on_cpu:
        report["gpu_section_on_cpu"] = gpu_section(args, "cpu", args.synthetic_train)
    elif torch.cuda.is_available() and args.device in ("auto", "cuda"):
        report["gpu"] = gpu_section(args)
    elif args.gpu_only:
        print("no CUDA GPU visible: nothing to measure for --gpu-only", file=sys.stderr)
    report["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
