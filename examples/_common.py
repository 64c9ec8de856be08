"""Data for the examples: split Fashion-MNIST (Debian's dataset-fashion-mnist) or split digits."""

from __future__ import annotations

import torch

from hat.app.experiment import DataNotFoundError, split_digits, split_fashion_mnist


def load_tasks(dataset: str, per_task: int | None = None, seed: int = 0) -> list:
    """5 two-class tasks; ``per_task`` caps the training images of each task (a quick run)."""
    if dataset == "fashion-mnist":
        try:
            tasks = split_fashion_mnist(5)
        except DataNotFoundError as err:
            raise SystemExit(f"{err}\n(or run with --dataset digits)") from None
    else:
        tasks = split_digits(5, seed=seed)
    if per_task is not None:
        g = torch.Generator().manual_seed(seed)
        capped = []
        for x_tr, y_tr, x_te, y_te in tasks:
            keep = torch.randperm(len(x_tr), generator=g)[:per_task]
            capped.append((x_tr[keep], y_tr[keep], x_te, y_te))
        tasks = capped
    return tasks
