"""Continual learning with a HAT ResNet-18 from timm, as in hat-cl's first example.

    python examples/continual_learning.py                                   # split Fashion-MNIST
    python examples/continual_learning.py --cifar-dir ~/data/cifar-10-batches-py   # split CIFAR-10, as the original

hat_resnet18s (small-image ResNet-18) learns five 2-class tasks in order with one AdamW
optimizer; after each task every task seen so far is evaluated with its hard masks. Prints the
accuracy matrix, average accuracy and BWT (exactly 0), and saves the matrix as a plot.
On 2 CPU cores keep --per-task small; on a GPU pass --device cuda and raise it.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import timm
import torch

import hat
import hat.timm_models  # noqa: F401
from hat import HATConfig
from hat.app.experiment import backward_transfer, split_cifar

from _common import load_tasks
from _loop import accuracy, train_task

parser = argparse.ArgumentParser()
parser.add_argument("--cifar-dir", default=None, help="a local cifar-10-batches-py folder (the original's dataset)")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--per-task", type=int, default=1000, help="training images per task")
parser.add_argument("--test-per-task", type=int, default=500, help="test images per task")
parser.add_argument("--device", default="cpu")
parser.add_argument("--out", default="continual_learning.png")
args = parser.parse_args()

if args.cifar_dir:
    tasks = [(x[:args.per_task], y[:args.per_task], xt, yt)
             for x, y, xt, yt in split_cifar("cifar10", 5, args.cifar_dir)]
else:
    tasks = load_tasks("fashion-mnist", args.per_task)
tasks = [(x, y, xt[:args.test_per_task], yt[:args.test_per_task]) for x, y, xt, yt in tasks]
tasks = [tuple(a.to(args.device) for a in task) for task in tasks]
torch.manual_seed(0)
model = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5), num_classes=2,
                          in_chans=tasks[0][0].shape[1]).to(args.device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)

matrix = []
for t, (x, y, _, _) in enumerate(tasks):
    train_task(model, optimizer, x, y, t, epochs=args.epochs, s_max=100.0, batch_size=64)
    matrix.append([accuracy(model, x_te, y_te, k) for k, (_, _, x_te, y_te) in enumerate(tasks[:t + 1])])
    print(f"after task {t}: " + "  ".join(f"{100 * a:5.1f}" for a in matrix[-1]), flush=True)
print(f"average accuracy {100 * sum(matrix[-1]) / len(matrix[-1]):.2f} %, "
      f"BWT {100 * backward_transfer(matrix) + 0.0:.3f} pp")

grid = [[100 * row[k] if k < len(row) else float("nan") for k in range(len(tasks))] for row in matrix]
fig, ax = plt.subplots(figsize=(5, 4))
ax.imshow(grid, vmin=50, vmax=100)
for t, row in enumerate(matrix):
    for k, a in enumerate(row):
        ax.text(k, t, f"{100 * a:.1f}", ha="center", va="center", fontsize=8)
ax.set_xlabel("task k")
ax.set_ylabel("after training task t")
ax.set_title("hat_resnet18s: accuracy (%)")
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
