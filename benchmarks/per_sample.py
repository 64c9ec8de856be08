"""Per-sample task ids: one forward over a batch of T tasks against T forwards, one per task.

    python benchmarks/per_sample.py        # about a minute

hat_resnet18s (set_task API), 1 thread, 3x32x32 inputs; a batch of 96 samples of 3 tasks (32
each) run once with per-sample ids, against the same samples as three batches of 32, one task
each. Evaluation (hard masks, no grad) and a training step (forward, backward, AdamW step).
Prints the median over repeats of the ratio (per-sample time / three-forwards time).
"""

from __future__ import annotations

import statistics
import time

import timm
import torch
import torch.nn.functional as F

import hat
import hat.timm_models  # registers the hat_* models in timm
from hat import HATConfig

TASKS, PER_TASK, REPEATS = 3, 32, 15


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=TASKS), num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(TASKS * PER_TASK, 3, 32, 32)
    y = torch.randint(0, 10, (TASKS * PER_TASK,))
    ids = torch.arange(TASKS).repeat_interleave(PER_TASK)[torch.randperm(TASKS * PER_TASK)]
    groups = [(ids == t).nonzero().flatten() for t in range(TASKS)]

    def step(task, xs, ys):
        hat.set_task(model, task, mask_scale=50.0)
        loss = F.cross_entropy(model(xs), ys)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def evaluate(task, xs):
        with torch.no_grad():
            hat.set_task(model, task)
            model(xs)

    runs = {
        "eval": (lambda: evaluate(ids, x), lambda: [evaluate(t, x[g]) for t, g in enumerate(groups)]),
        "train step": (lambda: step(ids, x, y), lambda: [step(t, x[g], y[g]) for t, g in enumerate(groups)]),
    }
    model.train()
    step(ids, x, y)  # the first call traces; every task trained once
    for name, (mixed, separate) in runs.items():
        model.train(name != "eval")
        ratios = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            mixed()
            t1 = time.perf_counter()
            separate()
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
        print(f"{name:10s}: one forward of {TASKS} tasks / {TASKS} forwards of one task each = "
              f"{statistics.median(ratios):.3f}x (median of {REPEATS})", flush=True)


if __name__ == "__main__":
    main()
