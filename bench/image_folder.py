"""A folder of JPEGs: hpo's decode-once cache and on-device training against a DataLoader over ImageFolder.

`dataset = "folder"` decodes every image once (Pillow in threads, JPEG draft mode, shorter side resized,
center crop) into a uint8 cache on disk; every trial then loads that cache, puts the uint8 tensor on the
training device and normalises and augments whole batches there, with no DataLoader. This script measures
what that buys on a generated folder of N JPEGs of varied sizes (80x60 to 120x100, a class-coloured square
on noise, so the training is meaningful), in one process, side by side:

1. the cache build: the first `load_data` on an empty `cache_dir` (images/s), then the reload from the cache
   in the same process after `clear_data_cache()` and in a new process (seconds);
2. images/s of training: hpo's `fit` (images_per_second from its history) against the loop a person writes:
   `torchvision.datasets.ImageFolder` with per-sample Resize, CenterCrop, RandomCrop(padding), flip,
   ToTensor and Normalize, a shuffling `DataLoader` (one worker per core, pinned memory on CUDA). Same
   model (objectives.networks), AdamW, batch size, training images and epochs; bf16 autocast and
   channels_last on CUDA in both, as `resolve_runtime` decides. With more than one epoch the first is
   warm-up and is not counted. Repeats alternate which loop goes first.

Images go to OUT/images/<class>/<i>.jpg and the cache to OUT/cache (a sibling, so ImageFolder does not take
it for a class); OUT is removed at the end unless --keep.

    python bench/image_folder.py --quick                                   # CPU smoke run, under a minute
    python bench/image_folder.py --images 10000 --size 64 --skip-training  # the cache alone
    python bench/image_folder.py --device cuda --images 10000 --size 96 --model torchvision:resnet18
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from objectives.augment import default_crop_padding  # noqa: E402
from objectives.data import DataSplits, clear_data_cache, load_data  # noqa: E402
from objectives.image_folder import scan  # noqa: E402
from objectives.networks import build_network, network_spec  # noqa: E402
from objectives.runtime import Runtime, resolve_runtime  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import fit  # noqa: E402
from objectives.user_data import read_user_data  # noqa: E402


def machine() -> dict[str, Any]:
    """What the figures were measured on, printed with them (the load average: the machine may be shared)."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


# --- the folder -----------------------------------------------------------------------------------------------


def class_image(label: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 of a random size: noise plus a square in the class's colour, placed inside the central
    square (the part a center crop keeps) so resizing, cropping and flipping never lose the label."""
    width, height = int(rng.integers(80, 121)), int(rng.integers(60, 101))
    image = rng.integers(0, 90, (height, width, 3), dtype=np.uint8)
    short = min(width, height)
    side = short // 3 + int(rng.integers(0, short // 6))
    x0, y0 = (width - short) // 2, (height - short) // 2
    left, top = x0 + int(rng.integers(0, short - side)), y0 + int(rng.integers(0, short - side))
    colour = [round(255 * c) for c in colorsys.hsv_to_rgb(label / classes, 1.0, 1.0)]
    image[top : top + side, left : left + side] = colour
    return image


def write_folder(root: Path, images: int, classes: int, seed: int = 0) -> float:
    """`root/c<k>/<i>.jpg`, classes balanced; returns the seconds it took (Pillow encodes in threads)."""
    from PIL import Image

    def write(i: int) -> None:
        label = i % classes
        rng = np.random.default_rng((seed, i))
        path = root / f"c{label:02d}" / f"{i}.jpg"
        Image.fromarray(class_image(label, classes, rng)).save(path, quality=90)

    start = time.perf_counter()
    for label in range(classes):
        (root / f"c{label:02d}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(write, range(images), chunksize=64))
    return time.perf_counter() - start


def folder_config(args: argparse.Namespace, device: str) -> TrainConfig:
    """The `[objective]` a folder study would have (model widths and lr at their defaults)."""
    return TrainConfig(dataset="folder", data_dir=str(args.out / "images"), cache_dir=str(args.out / "cache"),
                       image_size=args.size, channels=3, model=args.model, batch_size=args.batch_size,
                       augment=True, device=device)


# --- the cache ------------------------------------------------------------------------------------------------


def timed_load(cfg: TrainConfig) -> tuple[float, DataSplits]:
    """Seconds of `load_data` with the in-process cache emptied first (what a new trial process pays)."""
    clear_data_cache()
    start = time.perf_counter()
    data = load_data(cfg, resolve_runtime(cfg.device).device)
    if data.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, data


def reload_in_new_process(args: argparse.Namespace, device: str) -> tuple[float, float, float]:
    """Seconds of a new Python process (what a new trial process pays): its first `load_data` (which also
    imports what loading needs on first use), a second one after `clear_data_cache()` (the cache alone), and
    the process's whole wall time, interpreter and torch's import included."""
    command = [sys.executable, __file__, "--reload-only", "--out", str(args.out), "--size", str(args.size),
               "--model", args.model, "--batch-size", str(args.batch_size), "--device", device]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    child = json.loads(done.stdout.strip().splitlines()[-1])
    return child["first_s"], child["second_s"], wall


# --- training -------------------------------------------------------------------------------------------------


def counted(rates: list[float]) -> float:
    """The warm-up rule of both loops: with more than one epoch, the first is not counted."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def hpo_rate(cfg: TrainConfig, epochs: int) -> tuple[float, float]:
    """(images/s of hpo's loop, last validation accuracy), from fit's own per-epoch history."""
    history = fit(cfg, epochs).history
    return counted([h["images_per_second"] for h in history]), history[-1]["val_accuracy"]


def dataloader_rate(cfg: TrainConfig, data: DataSplits, runtime: Runtime, epochs: int, workers: int) -> float:
    """Images/s of the plain PyTorch loop: JPEGs decoded and augmented per sample in DataLoader workers, each
    batch copied to the device, `loss.item()` per batch. It trains on the same files as hpo's train split."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    size = data.image_size
    tf = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size),
        transforms.RandomCrop(size, padding=default_crop_padding(size)), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in data.mean], [s / 255 for s in data.std]),
    ])
    folder = datasets.ImageFolder(cfg.data_dir, transform=tf)
    position = {str(Path(p).relative_to(cfg.data_dir)): i for i, (p, _) in enumerate(folder.samples)}
    files = scan(Path(cfg.data_dir)).files
    train = [position[files[i]] for i in read_user_data(cfg).index["train"].tolist()]
    cuda = runtime.device.type == "cuda"
    loader = DataLoader(Subset(folder, train), batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                        pin_memory=cuda, persistent_workers=workers > 0)
    torch.manual_seed(cfg.seed)
    spec = network_spec(cfg, num_classes=data.num_classes, in_channels=3, image_size=size,
                        class_names=data.class_names)
    model = build_network(spec).to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=True if cuda else None)  # fused as in hpo's loop: compare the data paths
    model.train()
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        running = 0.0
        for x, y in loader:
            x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
            if runtime.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(y)
        if cuda:
            torch.cuda.synchronize()
        rates.append(len(train) / (time.perf_counter() - start))
    return counted(rates)


def compare_training(cfg: TrainConfig, data: DataSplits, args: argparse.Namespace) -> dict[str, Any]:
    """Both loops `args.repeats` times, alternating which goes first; medians of images/s and of the ratio."""
    runtime = resolve_runtime(cfg.device)
    ours, theirs, accuracy = [], [], []
    for r in range(args.repeats):
        for side in ("hpo", "dataloader") if r % 2 == 0 else ("dataloader", "hpo"):
            if side == "hpo":
                rate, acc = hpo_rate(cfg, args.epochs)
                ours.append(rate)
                accuracy.append(acc)
            else:
                theirs.append(dataloader_rate(cfg, data, runtime, args.epochs, args.workers))
            print(f"  repeat {r + 1} {side:<10} {(ours if side == 'hpo' else theirs)[-1]:8.0f} img/s", flush=True)
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"hpo_images_per_s": statistics.median(ours), "dataloader_images_per_s": statistics.median(theirs),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "hpo_val_accuracy": accuracy[-1], "train_images": len(data.train_y)}


# --- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10000, help="JPEGs to generate (default 10000)")
    p.add_argument("--size", type=int, default=64, help="image_size: side of the decoded square (default 64)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2, help="epochs per training run; >1: the first is warm-up")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--model", default="cnn", help="cnn or torchvision:NAME (default cnn)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (default: cores)")
    p.add_argument("--repeats", type=int, default=2, help="training comparisons, alternating order (default 2)")
    p.add_argument("--out", type=Path, default=Path("/tmp/hpo-bench-image-folder"), help="scratch folder")
    p.add_argument("--skip-training", action="store_true", help="measure the cache build and reload only")
    p.add_argument("--keep", action="store_true", help="keep OUT (images and cache) at the end")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 600 images, size 32, 1 epoch, 1 repeat")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON here")
    p.add_argument("--reload-only", action="store_true", help=argparse.SUPPRESS)  # the new-process reload
    args = p.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU, measuring on the CPU", file=sys.stderr)
        device = "cpu"
    if args.reload_only:
        cfg = folder_config(args, device)
        print(json.dumps({"first_s": timed_load(cfg)[0], "second_s": timed_load(cfg)[0]}))
        return
    if args.quick:
        args.images, args.size, args.epochs, args.repeats, device = 600, 32, 1, 1, "cpu"

    report: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:]}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), flush=True)
    shutil.rmtree(args.out, ignore_errors=True)
    try:
        written = write_folder(args.out / "images", args.images, args.classes)
        print(f"wrote {args.images} JPEGs (80x60 to 120x100, {args.classes} classes) in {written:.1f} s", flush=True)
        cfg = folder_config(args, device)
        import PIL.Image  # noqa: F401 - imported on first use by load_data; the build's figure is the decoding
        import sklearn.model_selection  # noqa: F401

        build, data = timed_load(cfg)
        reload, data = timed_load(cfg)
        fresh, fresh_again, fresh_wall = reload_in_new_process(args, device)
        report["cache"] = {"images": args.images, "size": args.size, "build_s": build,
                           "build_images_per_s": args.images / build, "reload_same_process_s": reload,
                           "reload_new_process_s": fresh, "reload_new_process_second_s": fresh_again,
                           "new_process_wall_s": fresh_wall,
                           "placement": data.placement, "device": str(data.device)}
        print(f"\ncache of {args.images} JPEGs at {args.size}x{args.size}, on {data.device}:\n"
              f"  build (first load_data, decode once)   {build:7.2f} s   {args.images / build:6.0f} images/s\n"
              f"  reload, same process (cache cleared)   {reload:7.2f} s\n"
              f"  reload, new process: first load_data   {fresh:7.2f} s   (first-use imports included)\n"
              f"  reload, new process: second load_data  {fresh_again:7.2f} s   (whole process with torch's "
              f"import {fresh_wall:.1f} s)", flush=True)
        if not args.skip_training:
            print(f"\ntraining {args.model}, {len(data.train_y)} train images, batch {args.batch_size}, "
                  f"{args.epochs} epoch(s){' (first is warm-up)' if args.epochs > 1 else ''}, "
                  f"{args.repeats} repeat(s):", flush=True)
            result = compare_training(cfg, data, args)
            report["training"] = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size,
                                  "workers": args.workers, "repeats": args.repeats, **result}
            rows = [("hpo: decode-once cache, uint8 on the device, batch augmentation",
                     result["hpo_images_per_s"],
                     f"{result['ratio_median']:.2f}x ({result['ratio_min']:.2f}-{result['ratio_max']:.2f})"),
                    (f"ImageFolder + per-sample transforms + DataLoader ({args.workers} workers)",
                     result["dataloader_images_per_s"], "1.00x")]
            print(f"\n{'path':<72} {'images/s':>9}  vs DataLoader loop")
            for name, rate, ratio in rows:
                print(f"{name:<72} {rate:9.0f}  {ratio}")
            print(f"(hpo's last validation accuracy {result['hpo_val_accuracy']:.3f})")
    finally:
        if not args.keep:
            shutil.rmtree(args.out, ignore_errors=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
