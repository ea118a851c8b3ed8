"""Everything issue 11 wants measured on a GPU, in one run of a few minutes, ending in one summary.

Run it through `bench/gpu_check.sh` (which prints the torch/CUDA/GPU versions first). Sections:

1. gpu tests: the tests under tests/ marked ``gpu`` (the suite deselects them where there is no CUDA), run
   with pytest in a child process;
2. epoch: seconds per epoch, training images per second and peak GPU memory of the shipped CIFAR-10 CNN
   (studies/cifar10.toml's objective: widths 64-128-256, 2 blocks per stage, SGD) on synthetic data of
   CIFAR-10's real size (45k train / 5k val, 3x32x32, 10 classes), with the precision and memory format
   objectives/runtime.py chooses (bf16 autocast and channels_last on a CUDA GPU, fp32 channels_last on the CPU);
3. compile: the same with `compile = true`, for the first trial in the process (which compiles; Inductor's
   on-disk cache, in /tmp, makes this cheaper on a machine that compiled the same model before) and for a
   second trial (what later trials of a worker pay);
4. trials as processes: 1, 2 and 4 concurrent `fit` processes on the one device, images/s summed;
5. packing: images per second of K = 1, 2, 4, 8 trials packed into one grouped network against the same K
   trials one after another (bench/packing_throughput.py), interleaved, for the quickstart CNN (digits, widths
   32-64) and the CIFAR-shaped CNN of section 2; and the other way to feed a GPU with a small CNN, one
   quickstart trial with `cuda_graphs = true` against the same trial eager;
6. epoch profile: the section-2 epoch under torch.profiler (bench/profile_epoch.py): GPU kernel time against the
   epoch's wall time (the GPU or the host is the limit), FLOPs per image and the arithmetic rate;
7. cuda graphs: `cuda_graphs = true` (each training step replayed as one CUDA graph, objectives/step_graph.py)
   on the shipped and the pool-first CNN, eager and compiled (bench/cifar_epoch_variants.py --only cuda_graphs,
   in a child process), seconds per 45k-image epoch against the shipped CNN without it;
8. study: `hpo run studies/cifar10.toml` end to end on the synthetic CIFAR-sized data, 4 trials x 2 epochs;
   its exit code and trial states.

A section that fails prints FAILED with the reason; the others still run and the exit code is 1.
`--cpu-smoke` runs the same steps on the CPU with tiny sizes (512/128 images, widths 8-16, 1 and 2 processes,
2-trial study)
so CI keeps the script working; its figures mean nothing.

    bash bench/gpu_check.sh                  # on a GPU machine, under 8 minutes
    bash bench/gpu_check.sh --cpu-smoke      # anywhere, under 2 minutes
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cifar_synthetic import CIFAR_STUDY, cifar_synthetic  # noqa: E402
from objectives.data import clear_data_cache, load_data  # noqa: E402
from objectives.runtime import resolve_runtime  # noqa: E402
from objectives.settings import TrainConfig  # noqa: E402
from objectives.train import fit  # noqa: E402

EPOCH_TARGET_S = 0.15  # issue 11: the default CIFAR-shaped CNN on an H100-class GPU, per epoch of 45k images


@dataclass(frozen=True)
class Sizes:
    """How big each step is: the real sizes on a GPU, tiny ones for the CPU smoke run."""

    device: str
    train: int
    val: int
    test: int
    widths: tuple[int, ...] | None  # None: the study file's
    blocks_per_stage: int | None
    batch_size: int
    epochs: int  # per timed fit, the first of them counted apart (warm-up, cuDNN autotuning, compilation)
    process_epochs: int  # per concurrent process, after one warm-up epoch
    process_counts: tuple[int, ...]
    process_threads: int | None  # torch CPU threads per concurrent process (None: torch's default)
    study_trials: int
    study_epochs: int
    time_limit_s: float


GPU = Sizes("cuda", 45_000, 5_000, 10_000, None, None, 512, 4, 3, (1, 2, 4), None, 4, 2, 480)
# the smoke run's 4 processes on a 2-core machine measured nothing and spent the most time of any section
CPU_SMOKE = Sizes("cpu", 512, 128, 128, (8, 16), 1, 128, 2, 1, (1, 2), 1, 2, 1, 120)


def sizes_for(cpu_smoke: bool, script: str) -> Sizes:
    """The sizes a GPU bench runs at (CPU_SMOKE or GPU), with the smoke run's thread count set; exit 2 with a
    one-line reason when the GPU run finds no CUDA GPU."""
    sizes = CPU_SMOKE if cpu_smoke else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print(f"{script}: torch sees no CUDA GPU; on a machine without one use --cpu-smoke", file=sys.stderr)
        raise SystemExit(2)
    if sizes.process_threads:
        torch.set_num_threads(sizes.process_threads)  # the smoke run: steadier on a small shared machine
    return sizes


def train_config(sizes: Sizes, compile_: bool = False) -> TrainConfig:
    """studies/cifar10.toml's objective on synthetic CIFAR-shaped data (the GPU machine cannot download), eager
    (`cuda_graphs = false`, which the study turns on): the baseline every section compares against, and what
    packs; the cuda graphs section and the study measure the setting."""
    update: dict[str, Any] = {"batch_size": sizes.batch_size, "lr": 0.1 * sizes.batch_size / 256, "compile": compile_,
                              "device": sizes.device, "dropout": 0.1, "cuda_graphs": False}
    if sizes.widths is not None:
        update["widths"] = sizes.widths
    if sizes.blocks_per_stage is not None:
        update["blocks_per_stage"] = sizes.blocks_per_stage
    return cifar_synthetic(sizes.train, sizes.val, sizes.test, **update)


def model_words(cfg: TrainConfig) -> str:
    return f"widths {'-'.join(map(str, cfg.widths))} x{cfg.blocks_per_stage}, batch {cfg.batch_size}"


# --- 1. the GPU-only tests --------------------------------------------------------------------------------------


class GpuOnly:
    """pytest plugin: keep the tests marked ``gpu``, count their outcomes."""

    def __init__(self) -> None:
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "selected": 0}

    def pytest_collection_modifyitems(self, session: Any, config: Any, items: list[Any]) -> None:
        keep = [i for i in items if i.get_closest_marker("gpu") is not None]
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("gpu") is None])
        items[:] = keep

    def pytest_collection_finish(self, session: Any) -> None:
        self.counts["selected"] = len(session.items)  # after every plugin's selection (none without CUDA)

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call":
            self.counts[report.outcome] += 1
        elif report.skipped:
            self.counts["skipped"] += 1
        elif report.failed:
            self.counts["errors"] += 1


def run_gpu_tests_here(files: list[str]) -> int:
    """In the child process: pytest over ``files`` with the GpuOnly plugin; prints its counts as JSON last."""
    import pytest

    plugin = GpuOnly()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *files], plugins=[plugin]) if files else 0
    print("GPU_TESTS " + json.dumps(plugin.counts))
    return 0 if code in (0, 5) else int(code)  # 5: nothing collected (no GPU tests), not a failure


def gpu_tests(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text())
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run-gpu-tests", *files], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=child_env())
    found = re.search(r"^GPU_TESTS (.*)$", done.stdout, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"pytest gave no result (exit {done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    counts = json.loads(found.group(1))
    for text in done.stdout.splitlines()[:-1]:
        if text.strip():
            print(f"  | {text}")
    if counts["failed"] or counts["errors"]:
        raise RuntimeError(f"{counts['failed']} failed, {counts['errors']} errors: {counts}")
    where = ", ".join(files) or "no test file mentions CUDA in a skipif"
    line = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
            f"({counts['selected']} selected: the tests that skip without CUDA, in {where})")
    return {**counts, "files": files}, line


# --- 2. and 3. epochs, memory, torch.compile ----------------------------------------------------------------------


def timed_fit(cfg: TrainConfig, epochs: int) -> dict[str, Any]:
    """One trial's training: first epoch apart (warm-up or compilation), the rest as the steady state."""
    cuda = cfg.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    history = fit(cfg, epochs).history
    total = time.perf_counter() - start
    steady = history[1:] or history
    return {"first_epoch_s": history[0]["epoch_seconds"],
            "epoch_s": statistics.median(h["epoch_seconds"] for h in steady),
            "images_per_s": statistics.median(h["images_per_second"] for h in steady), "total_s": total,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "val_accuracy": history[-1]["val_accuracy"]}


def epoch_section(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    cfg = train_config(sizes)
    runtime = resolve_runtime(cfg.device)
    start = time.perf_counter()
    load_data(cfg, runtime.device)  # generated and placed once, outside the timed epochs
    data_s = time.perf_counter() - start
    r = timed_fit(cfg, sizes.epochs)
    precision = f"{runtime.autocast_dtype} autocast".replace("torch.", "") if runtime.autocast_dtype else "fp32"
    layout = "channels_last" if runtime.channels_last else "contiguous (NCHW)"
    memory = f"peak memory {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] is not None else "peak memory n/a"
    target = ""
    if sizes.device == "cuda":
        target = f" [issue 11 target on an H100-class GPU <= {EPOCH_TARGET_S} s/epoch: " \
                 f"{'met' if r['epoch_s'] <= EPOCH_TARGET_S else 'not met'}]"
    line = (f"{r['epoch_s']:.3f} s/epoch (first {r['first_epoch_s']:.2f} s), {r['images_per_s']:,.0f} img/s training, "
            f"{memory}; {precision}, {layout}; {model_words(cfg)}, {sizes.train}/{sizes.val} images "
            f"(data made and placed in {data_s:.1f} s){target}")
    results["epoch_cfg"] = cfg.model_dump(mode="json")
    return {**r, "data_s": data_s, "precision": precision, "layout": layout}, line


def compile_section(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    off = results.get("epoch") or timed_fit(train_config(sizes), sizes.epochs)
    cold = timed_fit(train_config(sizes, compile_=True), sizes.epochs)
    warm = timed_fit(train_config(sizes, compile_=True), sizes.epochs)  # a second trial: caches warm
    saving = off["epoch_s"] - warm["epoch_s"]

    def pays(on: dict[str, Any]) -> str:
        cost = on["first_epoch_s"] - off["first_epoch_s"]
        if cost <= 0:
            return "no extra cost"
        return f"pays after {cost / saving:.0f} epochs" if saving > 0 else "never pays"

    speedup = off["epoch_s"] / warm["epoch_s"]
    line = (f"off {off['epoch_s']:.3f} s/epoch, on {warm['epoch_s']:.3f} s/epoch ({speedup:.2f}x), "
            f"{warm['images_per_s']:,.0f} img/s; first epoch off {off['first_epoch_s']:.1f} s, on (1st trial in the "
            f"process) {cold['first_epoch_s']:.1f} s ({pays(cold)}), on (2nd trial) {warm['first_epoch_s']:.1f} s "
            f"({pays(warm)})")
    return {"off": off, "on_cold": cold, "on_warm": warm}, line


# --- 4. several trials per device as processes ----------------------------------------------------------------


def _trial_process(cfg_json: str, epochs: int, threads: int | None, barrier: Any, queue: Any) -> None:
    """One concurrent trial: warm up (data on the device, autotuning) outside the window, then train."""
    try:
        if threads:
            torch.set_num_threads(threads)
        cfg = TrainConfig.model_validate_json(cfg_json)
        fit(cfg, 1)
        barrier.wait()
        start = time.time()
        result = fit(cfg, epochs)
        queue.put({"start": start, "end": time.time(), "images": len(result.data.train_y) * epochs})
    except BaseException as exc:  # reported by the parent, which would otherwise wait forever
        barrier.abort()
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def concurrent(cfg: TrainConfig, n: int, sizes: Sizes) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_trial_process, args=(cfg.model_dump_json(), sizes.process_epochs,
                                                      sizes.process_threads, barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=sizes.time_limit_s) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    errors = [g["error"] for g in got if "error" in g]
    if errors:
        raise RuntimeError(f"{n} processes: {errors[0]}")
    wall = max(g["end"] for g in got) - min(g["start"] for g in got)
    return {"processes": n, "images_per_s": sum(g["images"] for g in got) / wall, "wall_s": wall}


def processes_section(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    clear_data_cache()  # this process's copy of the data and cached blocks would crowd the children
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cfg = train_config(sizes)
    runs = [concurrent(cfg, n, sizes) for n in sizes.process_counts]
    one = runs[0]["images_per_s"]
    parts = [f"{r['processes']}: {r['images_per_s']:,.0f} img/s ({r['images_per_s'] / one:.2f}x)" for r in runs]
    return {"runs": runs}, "; ".join(parts) + f" (summed over the processes, {sizes.process_epochs} epoch(s) each)"


# --- 5. trial packing ---------------------------------------------------------------------------------------------

PACK_TARGET = 3.0  # issue 11: packing >= 3x the images/s of one trial at a time, quickstart CNN, H100-class GPU


def packing_section(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from bench.packing_throughput import compare, describe, quickstart_config

    rounds = 2 if sizes.device == "cuda" else 1
    quick = compare(quickstart_config(sizes.device), rounds=rounds)
    cifar = compare(train_config(sizes), rounds=rounds)
    best = max(r["ratio_vs_one"] for r in quick)
    target = ""
    if sizes.device == "cuda":
        target = (f" [issue 11 target on an H100-class GPU >= {PACK_TARGET:.0f}x one trial at a time, quickstart CNN: "
                  f"{'met' if best >= PACK_TARGET else 'not met'}, {best:.2f}x]")
    graphed = graphed_quickstart(sizes)
    line = (f"quickstart CNN: {describe(quick)} | CIFAR-shaped CNN: {describe(cifar)}{target} | quickstart CNN, one "
            f"trial of 3 epochs: {graphed['graphed']:,.0f} img/s with cuda_graphs vs {graphed['eager']:,.0f} eager "
            f"({graphed['ratio']:.2f}x)")
    return {"quickstart": quick, "cifar": cifar, "quickstart_cuda_graphs": graphed}, line


def graphed_quickstart(sizes: Sizes) -> dict[str, float]:
    """The other way to speed up a small CNN on a GPU: one quickstart trial with `cuda_graphs = true` (captured
    once per trial, about 10 ms, against a quickstart epoch of tens of ms) against the same trial eager, 3 epochs
    each, alternating, median of 3."""
    from bench.packing_throughput import images_per_second, quickstart_config

    eager = quickstart_config(sizes.device)
    cfgs = {"eager": eager, "graphed": eager.model_copy(update={"cuda_graphs": True})}
    for cfg in cfgs.values():
        images_per_second([cfg], 1, packed=False)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in cfgs}
    for _ in range(3):
        for name, cfg in cfgs.items():
            rates[name].append(images_per_second([cfg], 3, packed=False))
    out = {name: statistics.median(values) for name, values in rates.items()}
    return {**out, "ratio": out["graphed"] / out["eager"]}


# --- 6. where an epoch goes ---------------------------------------------------------------------------------------


def profile_section(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from bench.profile_epoch import describe, measure

    r = measure(train_config(sizes))
    for text in r.pop("table").splitlines()[:14]:
        print(f"  | {text}")
    return r, describe(r) + " (bench/profile_epoch.py)"


# --- 7. each step replayed as one CUDA graph (`cuda_graphs = true`) -------------------------------------------


def graphs_section(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """bench/cifar_epoch_variants.py --only cuda_graphs in a child process (a failed capture cannot spoil this
    one's CUDA context): the shipped CNN eager, then `cuda_graphs = true` on it and on the pool-first network."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-graphs-") as tmp:
        out = Path(tmp) / "graphs.json"
        cmd = [sys.executable, str(REPO / "bench" / "cifar_epoch_variants.py"), "--only", "cuda_graphs", "--json",
               str(out)]
        done = subprocess.run(cmd + (["--cpu-smoke"] if sizes.device == "cpu" else []), cwd=REPO, capture_output=True,
                              text=True, timeout=360, env=child_env())
        rows = json.loads(out.read_text()) if out.exists() else []
    for text in done.stdout.splitlines():
        if "FAILED" in text:
            print(f"  | {text.strip()}")
    if not rows:
        raise RuntimeError(f"no figures (exit {done.returncode}): {(done.stdout + done.stderr)[-800:]}")
    parts = [f"{r['variant']} {r['epoch_s']:.3f} s (first {r['first_epoch_s']:.1f} s)" for r in rows]
    best = min(rows, key=lambda r: r["epoch_s"])
    target = ""
    if sizes.device == "cuda":
        met = "met" if best["epoch_s"] <= EPOCH_TARGET_S else "not met"
        target = f" [issue 11 target <= {EPOCH_TARGET_S} s/epoch: {met}, best {best['variant']}]"
    failed = done.stdout.count("FAILED")
    line = f"s/epoch: {'; '.join(parts)}{target}" + (f"; {failed} variant(s) FAILED" if failed else "")
    if failed:
        raise RuntimeError(line)
    return {"rows": rows}, line


# --- 8. a study end to end ------------------------------------------------------------------------------------


def study_section(sizes: Sizes, results: dict[str, Any]) -> tuple[dict[str, Any], str]:
    import optuna

    from search.plugins import available

    if "cnn" not in available():
        raise RuntimeError("the project is not installed for this Python (no 'hpo.objectives' entry points, so `hpo "
                           "run` cannot find the cnn objective): `pip install -e .`, or offline `python3 -m pip install"
                           " --no-deps --no-index --no-build-isolation --target /tmp/site .`")
    overrides = {"objective.dataset": '"synthetic"', "objective.synthetic_shape": "[3, 32, 32]",
                 "objective.synthetic_train": sizes.train, "objective.synthetic_val": sizes.val,
                 "objective.synthetic_test": sizes.test, "objective.device": f'"{sizes.device}"',
                 "study.max_epochs": sizes.study_epochs, "study.n_trials": sizes.study_trials}
    if sizes.widths is not None:
        overrides["objective.widths"] = json.dumps(list(sizes.widths))
    if sizes.blocks_per_stage is not None:
        overrides["objective.blocks_per_stage"] = sizes.blocks_per_stage
    with tempfile.TemporaryDirectory(prefix="gpu-check-study-") as run_dir:
        cmd = [sys.executable, "-m", "search.cli", "run", str(CIFAR_STUDY), "--run-dir", run_dir, "--quiet"]
        for key, value in overrides.items():
            cmd += ["--set", f"{key}={value}"]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=child_env(),
                              timeout=sizes.time_limit_s)
        wall = time.perf_counter() - start
        db = Path(run_dir) / "cifar10" / "optuna.db"
        trials = optuna.load_study(study_name="cifar10", storage=f"sqlite:///{db}").trials if db.exists() else []
    states = {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    finished = states["COMPLETE"] + states["PRUNED"]
    values = [t.value for t in trials if t.value is not None]
    out = {"exit_code": done.returncode, "states": states, "wall_s": wall, "best_value": max(values, default=None),
           "command": " ".join(cmd[1:])}
    if done.returncode != 0 or finished != sizes.study_trials:
        for text in (done.stdout + done.stderr).splitlines()[-15:]:
            print(f"  | {text}")
        raise RuntimeError(f"exit {done.returncode}, {finished} of {sizes.study_trials} trials finished ({states})")
    best = f"best val_accuracy {out['best_value']:.4f}, " if values else ""
    line = (f"exit {done.returncode}, {finished} trials finished ({states['COMPLETE']} COMPLETE, {states['PRUNED']} "
            f"PRUNED, {states['FAIL']} FAIL), {best}{sizes.study_trials} trials x {sizes.study_epochs} epoch(s) in "
            f"{wall:.1f} s")
    return out, line


def child_env() -> dict[str, str]:
    """The environment for child processes: the repository importable, whatever PYTHONPATH already holds."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


# --- the run --------------------------------------------------------------------------------------------------


Section = Callable[[Sizes, dict[str, Any]], tuple[dict[str, Any], str]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU, to check the script runs")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--run-gpu-tests", nargs="*", help=argparse.SUPPRESS)  # the pytest child process
    args = parser.parse_args()
    if args.run_gpu_tests is not None:
        return run_gpu_tests_here(args.run_gpu_tests)

    sizes = sizes_for(args.cpu_smoke, "gpu_check")
    started = time.perf_counter()
    sections: list[tuple[str, str, Section]] = [
        ("gpu_tests", "gpu tests", gpu_tests),
        ("epoch", "epoch", epoch_section),
        ("compile", "compile", compile_section),
        ("processes", "trials as processes", processes_section),
        ("packing", "packing K=1,2,4,8", packing_section),
        ("profile", "epoch profile", profile_section),
        ("graphs", "cuda graphs", graphs_section),
    ]
    results: dict[str, Any] = {"sizes": asdict(sizes)}
    lines: list[tuple[str, str]] = []
    failed = False
    seconds: dict[str, float] = {}  # per section: where the time limit goes

    def write_json(total: float | None) -> None:
        """Every figure so far, after each section: a run stopped at the device's time limit still returns
        the sections it finished (``complete`` says whether it got to the end)."""
        if args.json:
            args.json.write_text(json.dumps({**results, "section_seconds": seconds, "summary": dict(lines),
                                             "total_s": total, "complete": total is not None}, indent=2, default=str))

    for key, label, run in [*sections, ("study", "study", study_section)]:
        print(f"gpu_check: {label} ...", flush=True)
        begun = time.perf_counter()
        try:
            results[key], text = run(sizes, results)
        except Exception as exc:  # one broken section must not hide the others' figures
            traceback.print_exc()
            text, failed = f"FAILED {type(exc).__name__}: {exc}", True
        seconds[key] = time.perf_counter() - begun
        lines.append((label, text))
        print(f"gpu_check: {label} ({seconds[key]:.0f} s): {text}", flush=True)
        write_json(None)

    total = time.perf_counter() - started
    device = (torch.cuda.get_device_name(0) if sizes.device == "cuda"
              else "CPU (smoke run: sizes are tiny, figures mean nothing)")
    print(f"\n=== gpu_check summary: {device}; torch {torch.__version__}, CUDA {torch.version.cuda} ===")
    for label, text in lines:
        print(f"{label + ':':<21}{text}")
    over = " -- OVER the limit" if total > sizes.time_limit_s else ""
    spent = ", ".join(f"{key} {secs:.0f}" for key, secs in seconds.items())
    print(f"{'total:':<21}{total:.0f} s (limit {sizes.time_limit_s:.0f} s){over}; seconds per section: {spent}")
    print(f"{'result:':<21}{'FAILED (see the sections above)' if failed else 'ok'}", flush=True)
    write_json(total)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
