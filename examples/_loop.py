"""The examples' training loop: hat.training's, on a converted model (set_task per batch), one optimizer."""

from __future__ import annotations

from torch import nn

import hat
from hat import HATConfig
from hat.training import predict
from hat.training import train_task as train_one_task


def mlp(in_features: int, cfg: HATConfig, hidden: int = 400) -> nn.Module:
    """A plain MLP converted in one line; its last Linear becomes one head per task."""
    plain = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                          nn.Linear(hidden, 2))
    return hat.convert(plain, cfg)


def train_task(model, optimizer, x, y, task, *, epochs, schedule="linear", s_max=400.0, reg=0.75,
               batch_size=32, on_batch=None) -> None:
    """hat.training's loop on a converted model (set_task per batch), batches shuffled by the global RNG;
    ``on_batch`` gets each batch's training accuracy."""
    train_one_task(model, optimizer, (x, y), task, epochs=epochs, batch_size=batch_size, forward="set_task",
                   scale_strat=schedule, max_scale=s_max, reg_strength=reg,
                   on_batch=None if on_batch is None else lambda step: on_batch(_batch_accuracy(step)))


def _batch_accuracy(step) -> float:
    return (step.logits.argmax(1) == step.y).float().mean().item()


def accuracy(model, x, y, task) -> float:
    return (predict(model, x, task, forward="set_task").argmax(1) == y).float().mean().item()


def capacity_used(model) -> float:
    """The share of masked units that some trained task uses."""
    layers = hat.capacity(model)
    return sum(layer.used for layer in layers) / max(sum(layer.units for layer in layers), 1)
