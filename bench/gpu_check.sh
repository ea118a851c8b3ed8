#!/usr/bin/env bash
# One GPU check (issue 11): GPU-only tests, seconds per epoch, images/s and peak memory of the CIFAR-shaped CNN
# on synthetic data of CIFAR-10's size, torch.compile on/off, 1/2/4 trial processes on the GPU, packing K = 1,
# 2, 4, 8 against K trials in sequence, an epoch profile, each step replayed as one CUDA graph
# (`cuda_graphs = true`), and a 4-trial `hpo run` end to end; one summary at the end. Under 8 minutes on a
# GPU (6.1 on an H100 with an earlier CUDA graph section; about 7 by estimate since the section trains three
# compiled variants and packing also times a graphed quickstart trial; BENCHMARKS.md section 9).
#
#   bash bench/gpu_check.sh                 # on a machine with a CUDA GPU and the project installed
#   bash bench/gpu_check.sh --cpu-smoke     # anywhere: the same steps on the CPU, tiny sizes, under 2 minutes
#   bash bench/gpu_check.sh --json out.json # also every figure as JSON
#
# Python: $PYTHON if set, else .venv/bin/python, else python3 (or python) on PATH. The work is in gpu_check.py.
#
# On a lent GPU machine (see the device README): it has no network, and its image has torch, torchvision,
# scikit-learn and pytest but not optuna, mlflow, optuna-dashboard or pydantic. Before the call, here, from the
# project root, fill .whl/ (ignored through .git/info/exclude) with `../shared/gpu/fetch-wheels.sh`; name
# `.whl` in the call's carry and start the command there with the prefix that script prints last, then install
# the project itself (offline, no dependencies) so `hpo run` finds its objectives through their entry points:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1;
#   python3 -m pip install -q --no-deps --no-index --no-build-isolation --target /tmp/site . || exit 1;
#   PYTHON=python3 bash bench/gpu_check.sh --json $OUT/gpu-check.json
# The check calls `python -m search.cli`, so the `hpo` console script need not be on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
  elif command -v python3 >/dev/null 2>&1; then PYTHON=python3
  else PYTHON=python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY'
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible"
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, GPU {gpu}", flush=True)
PY
exec "$PYTHON" bench/gpu_check.py "$@"
