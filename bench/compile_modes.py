"""torch.compile's shape modes against eager, for one small `fit` on the CPU (or any device): the first epoch
(compiling) and the steady epochs after it. Why `objectives/train.py` compiles with ``dynamic=False``.

    python bench/compile_modes.py              # eager, default (dynamic=None), static (dynamic=False); CPU
    python bench/compile_modes.py --modes eager static --train 128 --widths 4 8 --epochs 3   # smoke run
    python bench/compile_modes.py --device cuda --train 45000 --widths 64 128 256 --blocks 2 --batch-size 512
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("eager", "default", "static")


def one(mode: str, args: argparse.Namespace) -> str:
    """One mode in a fresh process (Dynamo's caches in memory would carry over between modes)."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
import objectives.train as T
from objectives.settings import TrainConfig
torch.set_num_threads({args.threads})
real = torch.compile
if {mode!r} == "default":
    T.torch.compile = lambda model, **kw: real(model)  # what train.py did before: dynamic=None
cfg = TrainConfig(device={args.device!r}, dataset="synthetic", synthetic_shape=(3, 32, 32),
                  synthetic_train={args.train}, synthetic_val={max(100, args.train // 4)}, synthetic_test=100,
                  widths={tuple(args.widths)!r}, blocks_per_stage={args.blocks}, batch_size={args.batch_size},
                  compile={mode != "eager"})
h = T.fit(cfg, {args.epochs}).history
steady = sorted(m["epoch_seconds"] for m in h[2:])
print(f"{{h[0]['epoch_seconds']:.2f}} s first epoch, steady {{steady[0]:.3f}}-{{steady[-1]:.3f}} s per epoch")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else f"FAILED: {done.stderr.strip()[-500:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train", type=int, default=2000, help="synthetic 3x32x32 training images")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6, help="at least 3: epochs 3.. are the steady ones")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="eager; default: torch.compile's dynamic=None; static: dynamic=False (train.py's)")
    args = parser.parse_args()
    failed = False
    for mode in args.modes:
        line = one(mode, args)
        failed |= line.startswith("FAILED")
        print(f"{mode:>8}: {line}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
