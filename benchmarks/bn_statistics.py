"""BatchNorm statistics against the network evaluation runs: eval accuracy (hard masks, running
statistics) minus train-mode accuracy (soft masks at s_max, batch statistics), on each task.

    python benchmarks/bn_statistics.py        # Debian's dataset-fashion-mnist (or --data-dir); about 10 minutes

Split Fashion-MNIST (5 tasks of 2 classes), a few hundred training images per task so that an
epoch has about 11 batches of 32 (the issue's case), a converted residual CNN with BatchNorm
(conv-BN-ReLU stem, two basic residual blocks, pooling, Linear-LayerNorm-ReLU, one head per
task), 5 epochs per task with the mask scale annealed from 1/100 to 100 in every epoch, three
seeds. Three rules for the running statistics, in the same run:

- ``torch``: torch's running average over every training batch (``stats_tolerance = -inf``, no
  refresh);
- ``training``: only the latest batch whose masks are about as hard as at s_max (no refresh): what
  a hand-built payload model gets;
- ``hat``: the finished task's rows taken once more with its final weights (the default for
  converted models; their training batches count by torch's rule until then, since 2026-12-01:
  the refresh replaces them, so this rule's figures are the same as with rule 1 before it).

Prints, per setting and rule: tasks whose eval accuracy is more than 2 points below train-mode
accuracy (of 5 tasks x seeds), the largest gap, and the mean test accuracy.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import HATConfig
from hat.app.experiment import split_fashion_mnist
from hat.modules import TaskIndexedBatchNorm2d
from hat.utils import get_hat_mask_scale, get_hat_reg_term

SETTINGS = {  # name -> (optimizer, schedule)
    "SGD lr 0.02 momentum 0.9 wd 5e-4, linear": ("sgd", "linear"),
    "SGD, cosine": ("sgd", "cosine"),
    "SGD, exponential": ("sgd", "exponential"),
    "Adam lr 1e-3, linear": ("adam", "linear"),
}
RULES = ("torch", "training", "hat")


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = Block(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block2 = Block(32)
        self.fc = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(64)
        self.heads = nn.ModuleList(nn.Linear(64, 2) for _ in range(num_tasks))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.heads[task](F.relu(self.norm(self.fc(x.mean((2, 3))))))


def run(tasks: list, optimizer_name: str, schedule: str, rule: str, seed: int) -> tuple[list[float], list[float]]:
    """(eval minus train-mode accuracy on each task's training images, test accuracy per task)."""
    torch.manual_seed(seed)
    model = hat.convert(ResidualCNN(len(tasks)), HATConfig(num_tasks=len(tasks)))
    for m in model.modules():
        if isinstance(m, TaskIndexedBatchNorm2d):
            m.stats_tolerance = float("-inf") if rule == "torch" else 0.01
            m.refresh_at_task_end = rule == "hat"
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
                 if optimizer_name == "sgd" else torch.optim.Adam(model.parameters(), lr=1e-3))
    g = torch.Generator().manual_seed(seed)
    gaps, tests = [], []
    for t, (x, y, x_te, y_te) in enumerate(tasks):
        model.train()
        for _ in range(5):
            batches = torch.randperm(len(x), generator=g).split(32)
            for b, idx in enumerate(batches):
                s = get_hat_mask_scale(schedule, 100.0, b / (len(batches) - 1))
                hat.set_task(model, t, mask_scale=s)
                loss = F.cross_entropy(model(x[idx], t), y[idx]) + 0.75 * get_hat_reg_term(
                    model, task_id=t, mask_scale=s)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            twin = copy.deepcopy(model)  # train mode on a copy: its forward leaves the model's statistics alone
            twin.__dict__.pop("_hat_stats_pending", None)
            hat.set_task(twin, t, mask_scale=100.0)
            train_acc = (twin(x, t).argmax(1) == y).float().mean().item()
            model.eval()
            with hat.task(model, t):
                eval_acc = (model(x, t).argmax(1) == y).float().mean().item()
                tests.append((model(x_te, t).argmax(1) == y_te).float().mean().item())
            model.train()
        gaps.append(eval_acc - train_acc)
    return gaps, tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-task", type=int, default=352, help="training images per task (11 batches of 32)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = split_fashion_mnist(5, args.data_dir)
    tasks = [(x[:args.per_task], y[:args.per_task], xt[:1000], yt[:1000]) for x, y, xt, yt in data]
    print(f"{'setting':42s} {'rule':9s} {'eval > 2 pt below train':>24s} {'largest gap':>12s} {'test acc':>9s}")
    for setting, (opt, schedule) in SETTINGS.items():
        for rule in RULES:
            gaps, tests = [], []
            for seed in args.seeds:
                g, te = run(tasks, opt, schedule, rule, seed)
                gaps += g
                tests += te
            below = sum(gap < -0.02 for gap in gaps)
            print(f"{setting:42s} {rule:9s} {f'{below} of {len(gaps)}':>24s} {100 * max(0.0, -min(gaps)):11.1f}  "
                  f"{100 * statistics.mean(tests):8.2f}%", flush=True)


if __name__ == "__main__":
    main()
