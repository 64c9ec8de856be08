"""Mask initialization (normal vs dense) and mask-scale schedule (linear vs cosine).

    python examples/mask_init_and_scaling.py                   # split Fashion-MNIST, writes mask_init_and_scaling.png
    python examples/mask_init_and_scaling.py --dataset digits

For each of the four combinations: the batches the first task needs before its running
training accuracy reaches 95%, and the final average accuracy over the five tasks.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from hat import HATConfig

from _common import load_tasks
from _loop import accuracy, mlp, train_task

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--per-task", type=int, default=3000, help="training images per task")
parser.add_argument("--out", default="mask_init_and_scaling.png")
args = parser.parse_args()

tasks = load_tasks(args.dataset, args.per_task)
in_features = tasks[0][0][0].numel()
results = {}
for init in ("normal", "dense"):
    for schedule in ("linear", "cosine"):
        torch.manual_seed(0)
        model = mlp(in_features, HATConfig(num_tasks=5, init_strat=init, max_trn_mask_scale=400.0,
                                           grad_comp_factor=400.0))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        seen: list[float] = []
        for t, (x, y, _, _) in enumerate(tasks):
            train_task(model, optimizer, x, y, t, epochs=args.epochs, schedule=schedule,
                       on_batch=seen.append if t == 0 else None)
        window = 10  # running accuracy over the last 10 batches of task 0
        running = [sum(seen[max(0, i - window + 1):i + 1]) / min(i + 1, window) for i in range(len(seen))]
        converge = next((i + 1 for i, a in enumerate(running) if a >= 0.95 and i + 1 >= window), None)
        final = sum(accuracy(model, x_te, y_te, t) for t, (_, _, x_te, y_te) in enumerate(tasks)) / len(tasks)
        results[(init, schedule)] = (converge, final, running)
        print(f"init={init:6s} schedule={schedule:6s}: batches to 95% on task 0: {converge}, "
              f"final average accuracy {100 * final:.2f} %")

fig, ax = plt.subplots(figsize=(6, 3.5))
for (init, schedule), (_, final, running) in results.items():
    ax.plot(running, label=f"{init} / {schedule} (final {100 * final:.1f}%)")
ax.set_xlabel("batch (task 0)")
ax.set_ylabel("running training accuracy")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
