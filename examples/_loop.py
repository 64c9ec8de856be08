"""The training loop the examples share: a converted model, one optimizer, set_task per batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import HATConfig
from hat.app.experiment import capacity
from hat.utils import get_hat_mask_scale, get_hat_reg_term


def mlp(in_features: int, cfg: HATConfig, hidden: int = 400) -> nn.Module:
    """A plain MLP converted in one line; its last Linear becomes one head per task."""
    plain = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 2))
    return hat.convert(plain, cfg)


def train_task(model, optimizer, x, y, task, *, epochs, schedule="linear", s_max=400.0, reg=0.75,
               batch_size=32, on_batch=None) -> None:
    model.train()
    for _ in range(epochs):
        batches = torch.randperm(len(x)).split(batch_size)
        for b, idx in enumerate(batches):
            s = get_hat_mask_scale(schedule, s_max, b / max(len(batches) - 1, 1))
            hat.set_task(model, task, mask_scale=s)
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) + reg * get_hat_reg_term(model, task_id=task, mask_scale=s)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if on_batch is not None:
                on_batch((logits.argmax(1) == y[idx]).float().mean().item())


@torch.no_grad()
def accuracy(model, x, y, task) -> float:
    model.eval()
    with hat.task(model, task):
        return (model(x).argmax(1) == y).float().mean().item()


def capacity_used(model) -> float:
    """The share of masked units that some trained task uses."""
    per_layer = capacity(model).values()
    return sum(u for u, _ in per_layer) / max(sum(n for _, n in per_layer), 1)
