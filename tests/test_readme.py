"""The README's examples run as printed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def _run(heading: str, label: str) -> dict:
    """Run the README's code block after ``heading`` (exec is the point: the README's own code)."""
    ns: dict = {}
    exec(compile(_block_after(heading), label, "exec"), ns)  # noqa: S102
    return ns


def test_quick_start_runs():
    ns = _run("## Quick start", "README quick start")
    assert ns["output_data"].shape == (10, 2)


def test_own_model_example_learns_every_task_and_exports():
    ns = _run("## Use HAT with your own model", "README own model")
    assert min(ns["accuracy"].values()) >= 0.97, ns["accuracy"]
    assert not any(type(m).__module__.startswith("hat") for m in ns["plain_task_0"].modules())


def test_deploy_and_forget_example_continues_the_own_model_example():
    import torch

    import hat

    ns = _run("## Use HAT with your own model", "README own model")
    model, x = ns["model"], ns["x"]
    with torch.no_grad(), hat.task(model, 0):
        task_0 = model(x)
    exec(compile(_block_after("## Deploy one task, forget another"), "README deploy", "exec"), ns)  # noqa: S102
    with torch.no_grad(), hat.task(model, 2):
        want = model(x)
    assert torch.allclose(ns["program"].module()(x), want, atol=1e-5 * float(want.abs().max()))
    assert all(r.params_pruned < r.params for r in ns["report"])
    assert hat.trained_tasks(model) == [0, 2, 3, 4]
    with torch.no_grad(), hat.task(model, 0):
        assert torch.equal(model(x), task_0)


def test_timm_example_runs():
    ns = _run("## HAT networks in timm", "README timm")
    assert ns["logits"].shape == (8, 10)
