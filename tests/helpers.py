"""The suite's training loop on payloads, as a hat-cl user writes it: hat.training's one loop."""

from __future__ import annotations

from typing import Callable

import torch

import hat
from hat import HATPayload, training


def train_task(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               task_id: int, *, epochs: int = 5, batch_size: int = 32, s_max: float = 100.0,
               reg: float = 0.75, set_to_none: bool = True, seed: int = 0,
               forward: Callable | None = None) -> None:
    """Train ``task_id`` with the paper's per-epoch linear scale annealing and the mask regularizer,
    batches shuffled by a generator seeded with ``seed + task_id``. ``forward(model, payload) -> logits``
    (default: the payload's model, ``model(payload).data``)."""
    training.train_task(model, optimizer, (x, y), task_id, epochs=epochs, batch_size=batch_size,
                        generator=torch.Generator().manual_seed(seed + (task_id or 0)),
                        forward=_on_payloads(forward), scale_strat="linear", max_scale=s_max, reg_strength=reg,
                        set_to_none=set_to_none)


def eval_logits(model: torch.nn.Module, x: torch.Tensor, task_id: int | None,
                forward: Callable | None = None) -> torch.Tensor:
    """Hard-mask eval-mode logits of ``task_id``."""
    return training.predict(model, x, task_id, forward=_on_payloads(forward))


def _on_payloads(forward: Callable | None) -> training.Forward:
    """hat.training's ``forward`` for a ``forward(model, payload)`` hook."""
    if forward is None:
        return "payload"
    return lambda m, x, task_id, mask_scale: forward(m, HATPayload(x, task_id=task_id, mask_scale=mask_scale))


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def tensor_forward(model: torch.nn.Module, payload: HATPayload) -> torch.Tensor:
    """``forward`` for a converted model: the payload's task as model state, its data as a tensor."""
    hat.set_task(model, payload.task_id, mask_scale=payload.mask_scale)
    return model(payload.data)
