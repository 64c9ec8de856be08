"""The README's examples run as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_quick_start_runs():
    ns: dict = {}
    exec(compile(_block_after("## Quick start"), "README quick start", "exec"), ns)
    assert ns["output_data"].shape == (10, 2)


def test_own_model_example_learns_every_task_and_exports():
    ns: dict = {}
    exec(compile(_block_after("## Use HAT with your own model"), "README own model", "exec"), ns)
    assert min(ns["accuracy"].values()) >= 0.97, ns["accuracy"]
    assert not any(type(m).__module__.startswith("hat") for m in ns["plain_task_0"].modules())


def test_timm_example_runs():
    ns: dict = {}
    exec(compile(_block_after("## HAT networks in timm"), "README timm", "exec"), ns)
    assert ns["logits"].shape == (8, 10)
