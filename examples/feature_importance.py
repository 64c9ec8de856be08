"""Which input pixels does each task need? A learnable HAT mask over the pixels, per task.

    python examples/feature_importance.py                 # split Fashion-MNIST, writes feature_importance.png
    python examples/feature_importance.py --dataset digits

A HATMasker in front of a HAT MLP learns, for every task, a binary mask over the 784 (or 64)
input pixels; HAT's regularizer pushes it to keep as few as the task needs. The masks are the
feature-importance maps. (Payload API, as hat-cl's users write it.)
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from hat import HATConfig, HATPayload
from hat.modules import HATLinear, HATMasker, TaskIndexedLinear
from hat.training import train_task

from _common import load_tasks

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--per-task", type=int, default=None, help="training images per task (default: all)")
parser.add_argument("--out", default="feature_importance.png")
args = parser.parse_args()

torch.manual_seed(0)
tasks = load_tasks(args.dataset, args.per_task)
side = tasks[0][0].shape[-1]
cfg = HATConfig(num_tasks=5, max_trn_mask_scale=400.0, grad_comp_factor=400.0)


class MaskedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.pixels = HATMasker(side * side, cfg)  # one learnable mask per task over the input pixels
        self.fc1 = HATLinear(side * side, 400, cfg)
        self.fc2 = HATLinear(400, 400, cfg)
        self.relu = nn.ReLU()
        self.head = TaskIndexedLinear(5, 400, 2)

    def forward(self, p: HATPayload) -> HATPayload:
        p = self.pixels(p.forward_by(self.flatten))
        p = self.fc1(p).forward_by(self.relu)
        p = self.fc2(p).forward_by(self.relu)
        return self.head(p)


model = MaskedMLP()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # one optimizer for the whole sequence
for t, (x, y, _, _) in enumerate(tasks):
    # cross-entropy + 0.75 x HAT's regularizer, the scale annealed 1/400 -> 400 in each epoch, batches of 32
    train_task(model, optimizer, (x, y), t, epochs=args.epochs, forward="payload", reg_strength=0.75)

model.eval()
fig, axes = plt.subplots(1, 5, figsize=(12, 2.8))
with torch.no_grad():
    for t, (_, _, x_te, y_te) in enumerate(tasks):
        acc = (model(HATPayload(x_te, task_id=t)).data.argmax(1) == y_te).float().mean().item()
        mask = model.pixels.get_mask(t).view(side, side)
        print(f"task {t}: accuracy {100 * acc:.2f} %, pixels kept {int(mask.sum())} / {side * side}")
        axes[t].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[t].set_title(f"task {t}: {100 * mask.mean():.0f}% of pixels", fontsize=9)
        axes[t].axis("off")
fig.suptitle("input pixels each task keeps (white)")
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
