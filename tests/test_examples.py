"""The six example studies run top to bottom (tiny settings): five write their plots, pruning.py a model."""

from __future__ import annotations

import os
import re
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
    "class_incremental.py": ["--dataset", "digits", "--epochs", "2", "--batch-size", "32"],
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


@pytest.mark.slow
def test_pruning_example_exports_a_smaller_model_and_keeps_the_other_tasks_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "pruning.py", "--dataset", "digits", "--per-task", "64", "--repeats", "2",
                           "--out", str(tmp_path)], cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = re.search(r"pruned: ([\d,]+) parameters \(full ([\d,]+)\)", done.stdout)
    assert counts, done.stdout
    pruned, full = (int(c.replace(",", "")) for c in counts.groups())
    assert pruned < full
    assert "predictions identical" in done.stdout
    assert "loaded back: modules from ['torch'], outputs equal: True" in done.stdout
    assert (tmp_path / "task2.pt2").is_file()
    assert done.stdout.count("tasks 0, 2, 3, 4 bit-identical") == 2, done.stdout
