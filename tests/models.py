"""Small hand-built HAT networks on payloads, as hat-cl's users build them."""

from __future__ import annotations

import torch
from torch import nn

from hat import HATConfig, HATPayload
from hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d, TaskIndexedLinear


class MLP(nn.Module):
    """64-256-256 HAT MLP with one plain nn.Linear head per task."""

    def __init__(self, cfg: HATConfig, hidden: int = 256, classes: int = 2) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = HATLinear(64, hidden, cfg)
        self.fc2 = HATLinear(hidden, hidden, cfg)
        self.relu = nn.ReLU()
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(cfg.num_tasks))

    def forward(self, p: HATPayload) -> HATPayload:
        p = p.forward_by(self.flatten)
        p = self.fc1(p).forward_by(self.relu)
        p = self.fc2(p).forward_by(self.relu)
        return p.forward_by(self.heads[p.task_id])


class CNN(nn.Module):
    """HATConv2d + TaskIndexedBatchNorm2d blocks, flatten, HATLinear, TaskIndexedLinear head."""

    def __init__(self, cfg: HATConfig, classes: int = 2, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = HATConv2d(1, 16, 3, cfg, padding=1)
        self.bn1 = TaskIndexedBatchNorm2d(cfg.num_tasks, 16)
        self.conv2 = HATConv2d(16, 32, 3, cfg, padding=1, groups=groups)
        self.bn2 = TaskIndexedBatchNorm2d(cfg.num_tasks, 32)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = HATLinear(32 * 4 * 4, 64, cfg)
        self.head = TaskIndexedLinear(cfg.num_tasks, 64, classes)

    def forward(self, p: HATPayload) -> HATPayload:
        p = self.bn1(self.conv1(p)).forward_by(self.relu)
        p = self.bn2(self.conv2(p)).forward_by(self.relu).forward_by(self.pool)
        p = self.fc(p.forward_by(self.flatten)).forward_by(self.relu)
        return self.head(p)


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "sgd-momentum-wd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=2e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=2e-3, weight_decay=0.01),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3),
    # not elementwise (factored second moments): the step conditions its gradients as well
    "adafactor": lambda params: torch.optim.Adafactor(params, lr=1e-2),
}
