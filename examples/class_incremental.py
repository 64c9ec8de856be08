"""Class-incremental learning: which task, and which class, when no task id is given (hat.predict).

    python examples/class_incremental.py                          # split Fashion-MNIST, writes class_incremental.png
    python examples/class_incremental.py --dataset digits --epochs 10   # scikit-learn digits, a few seconds

A plain MLP converted with hat.convert learns five 2-class tasks in class order (classes 0-1,
2-3, ...), one head per task. HAT keeps each task's masked network as it was trained, so what
that network computes for a sample is a fixed fingerprint of the task. When a task ends,
hat.fit_task_scores records statistics of its training data (per-class means, a covariance of
the masked features shared by the task's classes and one of the pixels per class; never a
sample). At test time hat.predict scores every sample under every task in one batched
forward, picks the task that fits best and takes that task's head's class: all 10 classes, no
task id, no stored sample. Printed: the task-prediction, class-incremental and
task-incremental accuracy, and the confusion between tasks, which is also saved as a picture
beside how far the winning task's score leads.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import hat
from hat import HATConfig

from _common import load_tasks
from _loop import accuracy, mlp, train_task

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--per-task", type=int, default=None, help="training images per task (default: all)")
parser.add_argument("--out", default="class_incremental.png")
args = parser.parse_args()

FASHION = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
names = FASHION if args.dataset == "fashion-mnist" else [str(d) for d in range(10)]
task_names = [f"{names[2 * t]}/{names[2 * t + 1]}" for t in range(5)]

torch.manual_seed(0)
tasks = load_tasks(args.dataset, args.per_task)
side = tasks[0][0].shape[-1]
model = mlp(side * side, HATConfig(num_tasks=5))  # nn.Sequential 400-400 converted in one line
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # one optimizer for every task

for t, (x, y, x_te, y_te) in enumerate(tasks):
    train_task(model, optimizer, x, y, t, epochs=args.epochs, batch_size=args.batch_size)
    hat.fit_task_scores(model, t, (x, y))  # the task's statistics; from here on its samples could go
    print(f"task {t} ({task_names[t]}): test accuracy with its task id {100 * accuracy(model, x_te, y_te, t):.1f} %",
          flush=True)

# what task prediction keeps: buffers of the model, saved with its state_dict
kept = sum(b.numel() for n, b in model.named_buffers() if n.startswith("hat_task_scores_") and "config" not in n)
seen = sum(x.numel() for x, _, _, _ in tasks)
print(f"\ntask-prediction statistics: {kept:,} numbers in model.state_dict(); the training images held {seen:,} "
      f"(0 samples stored)")

# -- no task id: predict the task, then the class -----------------------------------------------
x_all = torch.cat([x_te for _, _, x_te, _ in tasks])
true_task = torch.cat([torch.full_like(y_te, t) for t, (_, _, _, y_te) in enumerate(tasks)])
true_class = torch.cat([y_te + 2 * t for t, (_, _, _, y_te) in enumerate(tasks)])
pred = hat.predict(model, x_all)  # every task scored in one forward of 5 x len(x_all) rows
task_right = pred.task_id == true_task
class_right = pred.global_class == true_class
til = sum(accuracy(model, x_te, y_te, t) for t, (_, _, x_te, y_te) in enumerate(tasks)) / len(tasks)
print(f"task-prediction accuracy:                  {100 * task_right.float().mean():.2f} %")
print(f"class-incremental accuracy (no task id):   {100 * class_right.float().mean():.2f} %  (10 classes)")
print(f"task-incremental accuracy (task id given): {100 * til:.2f} %  (2 classes per task)")
print(f"class right when the task is right: {100 * class_right[task_right].float().mean():.2f} %; "
      f"of the class-incremental errors, {100 * (~task_right[~class_right]).float().mean():.0f} % are a wrong task")

confusion = torch.zeros(5, 5, dtype=torch.long)
confusion.index_put_((true_task, pred.task_id), torch.ones_like(true_task), accumulate=True)
print("\nconfusion between tasks (row: true task, column: predicted task; test samples)")
print("            " + "".join(f"{t:>7d}" for t in range(5)))
for t in range(5):
    print(f"  task {t:<5d}" + "".join(f"{int(n):7d}" for n in confusion[t]))

# how far the winning task leads the runner-up: small leads are where the errors are
top2 = pred.scores.topk(2, dim=1).values
lead = (top2[:, 0] - top2[:, 1]).clamp(max=20)
fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
share = 100 * confusion / confusion.sum(1, keepdim=True)
ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
for i in range(5):
    for j in range(5):
        ax.text(j, i, f"{share[i, j]:.1f}", ha="center", va="center", fontsize=8,
                color="white" if share[i, j] > 50 else "black")
ax.set_xticks(range(5), task_names, rotation=30, ha="right", fontsize=8)
ax.set_yticks(range(5), task_names, fontsize=8)
ax.set_xlabel("predicted task")
ax.set_ylabel("true task")
ax.set_title(f"task prediction, % of each task's test samples\n(accuracy {100 * task_right.float().mean():.1f} %)",
             fontsize=10)
bins = torch.linspace(0, 20, 41).tolist()
bx.hist(lead[task_right].tolist(), bins=bins, alpha=0.7, label="task right")
bx.hist(lead[~task_right].tolist(), bins=bins, alpha=0.7, label="task wrong")
bx.set_yscale("log")
bx.set_xlabel("score of the best task minus the runner-up (clipped at 20)")
bx.set_ylabel("test samples")
bx.legend()
bx.set_title(f"class-incremental accuracy {100 * class_right.float().mean():.1f} %, no task id", fontsize=10)
fig.tight_layout()
fig.savefig(args.out, dpi=110)
print(f"wrote {args.out}")
