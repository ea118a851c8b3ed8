"""``warm_model_logging`` (search/tracking.py): what `hpo run --workers` does while its workers train, so that
logging the best model at the end does not pay torch.export's and MLflow's first-call set-up. It reaches into
one private MLflow cache; this test fails if MLflow moves it, when the warm-up would silently stop saving time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_warming_up_fills_mlflow_s_module_map_and_leaves_export_ready() -> None:
    script = (
        "import time\n"
        "from mlflow.utils import requirements_utils as r\n"
        "from search.tracking import warm_model_logging\n"
        "assert r._MODULES_TO_PACKAGES is None and r._PACKAGES_TO_MODULES is None\n"
        "warm_model_logging()\n"
        "assert r._MODULES_TO_PACKAGES['torch'] == ['torch'] and 'torch' in r._PACKAGES_TO_MODULES\n"
        "import torch\n"
        "start = time.perf_counter()\n"
        "torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))\n"
        "print(round(time.perf_counter() - start, 3))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) < 0.5  # a first export costs about a second; this one found it set up
