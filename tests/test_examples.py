"""The four example studies run top to bottom (tiny settings) and write their plots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
FASHION = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")

CASES = {
    "feature_importance.py": ["--dataset", "digits", "--epochs", "1"],
    "mask_init_and_scaling.py": ["--dataset", "digits", "--epochs", "1", "--per-task", "200"],
    "regularization_vs_compensation.py": ["--dataset", "digits", "--epochs", "1", "--per-task", "200",
                                          "--regs", "0", "2", "--factors", "1", "100"],
    "continual_learning.py": ["--per-task", "64", "--test-per-task", "64"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(CASES))
def test_example_runs_and_writes_its_plot(script, tmp_path):
    if script == "continual_learning.py" and not FASHION.exists() and os.environ.get("CI", "") not in ("1", "true"):
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path / "plot.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, script, *CASES[script], "--out", str(out)], cwd=EXAMPLES, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in done.stdout
