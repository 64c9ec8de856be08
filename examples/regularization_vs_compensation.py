"""A grid over the mask regularization weight c and the embedding-gradient compensation factor,
with SGD and with Adam: average accuracy and the capacity the five tasks use.

    python examples/regularization_vs_compensation.py            # split Fashion-MNIST, writes the heat maps
    python examples/regularization_vs_compensation.py --dataset digits
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from hat import HATConfig

from _common import load_tasks
from _loop import accuracy, capacity_used, mlp, train_task

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--per-task", type=int, default=2000, help="training images per task")
parser.add_argument("--regs", type=float, nargs="+", default=[0.0, 0.75, 2.0, 5.0])
parser.add_argument("--factors", type=float, nargs="+", default=[1.0, 10.0, 100.0, 400.0])
parser.add_argument("--out", default="regularization_vs_compensation.png")
args = parser.parse_args()

OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "Adam": lambda params: torch.optim.Adam(params, lr=1e-3),
}
tasks = load_tasks(args.dataset, args.per_task)
in_features = tasks[0][0][0].numel()
grids = {}
for name, make in OPTIMIZERS.items():
    acc_grid = torch.zeros(len(args.regs), len(args.factors))
    cap_grid = torch.zeros_like(acc_grid)
    for i, reg in enumerate(args.regs):
        for j, factor in enumerate(args.factors):
            torch.manual_seed(0)
            model = mlp(in_features, HATConfig(num_tasks=5, max_trn_mask_scale=400.0, grad_comp_factor=factor))
            optimizer = make(model.parameters())
            for t, (x, y, _, _) in enumerate(tasks):
                train_task(model, optimizer, x, y, t, epochs=args.epochs, reg=reg)
            acc_grid[i, j] = sum(accuracy(model, x_te, y_te, t) for t, (_, _, x_te, y_te) in enumerate(tasks)) / 5
            cap_grid[i, j] = capacity_used(model)
            print(f"{name:4s} c={reg:<5g} compensation={factor:<5g}: average accuracy {100 * acc_grid[i, j]:.2f} %, "
                  f"capacity used {100 * cap_grid[i, j]:.1f} %", flush=True)
    grids[name] = (acc_grid, cap_grid)

fig, axes = plt.subplots(2, 2, figsize=(9, 7))
for row, (name, (acc_grid, cap_grid)) in enumerate(grids.items()):
    for col, (grid, what) in enumerate([(acc_grid, "average accuracy"), (cap_grid, "capacity used")]):
        ax = axes[row, col]
        ax.imshow(100 * grid, cmap="viridis", vmin=0, vmax=100)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                ax.text(j, i, f"{100 * grid[i, j]:.0f}", ha="center", va="center", fontsize=8, color="white")
        ax.set_xticks(range(len(args.factors)), [f"{f:g}" for f in args.factors])
        ax.set_yticks(range(len(args.regs)), [f"{r:g}" for r in args.regs])
        ax.set_xlabel("compensation factor")
        ax.set_ylabel("regularization c")
        ax.set_title(f"{name}: {what} (%)", fontsize=9)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
