"""A task-incremental continual-learning run: data, networks, the training loop and the metrics.

The library side of ``python -m hat run``; usable on its own::

    import torch
    from hat.app.experiment import (average_accuracy, backward_transfer, build_model, build_optimizer, run_sequence,
                                split_digits)

    tasks = split_digits(num_tasks=5, seed=0)
    model = build_model("mlp", num_tasks=5, classes_per_task=2)
    optimizer = build_optimizer("adamw", model.parameters(), lr=1e-3)   # one optimizer for all tasks
    matrix = run_sequence(model, optimizer, tasks, generator=torch.Generator().manual_seed(0))
    print(average_accuracy(matrix), backward_transfer(matrix))

``matrix[t][k]`` is the accuracy on task ``k`` after training tasks ``0..t`` (``k <= t``).
Randomness comes from the ``torch.Generator`` objects passed in; the global RNG is only used by
weight initialization in :func:`build_model` (seed it, or fork it, around the call).
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from hat import training
from hat.config import HATConfig
from hat.convert.api import _ensure_root_hook
from hat.convert.capacity import capacity as layer_capacity
from hat.errors import HATValueError
from hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d, TaskIndexedLinear
from hat.payload import HATPayload

__all__ = [
    "METHODS",
    "MODELS",
    "OPTIMIZERS",
    "DataNotFoundError",
    "Method",
    "Task",
    "average_accuracy",
    "backward_transfer",
    "build_model",
    "build_optimizer",
    "capacity_report",
    "class_incremental",
    "evaluate",
    "evaluate_class_incremental",
    "forgetting",
    "permuted_fashion_mnist",
    "run_sequence",
    "split_cifar",
    "split_digits",
    "split_fashion_mnist",
    "timm_model_names",
    "train_task",
]

# (x_train, y_train, x_test, y_test); x is [N, C, H, W] float in [0, 1], y holds labels 0..classes-1
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Method = Literal["hat", "finetune"]
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("adamw", "adam", "sgd")
METHODS = ("hat", "finetune")


# -- data ---------------------------------------------------------------------------------------
def split_digits(num_tasks: int = 5, seed: int = 0, train_fraction: float = 0.7) -> list[Task]:
    """scikit-learn's bundled 8x8 digits (1797 images) as 2-class tasks: task ``t`` is digit
    ``2t`` (label 0) against digit ``2t + 1`` (label 1).

    Each digit is split ``train_fraction`` / rest at random (seeded), so both splits keep the
    class balance. ``x`` is ``[N, 1, 8, 8]`` float32 in [0, 1], ``y`` int64 in {0, 1}.
    """
    _check_num_tasks(num_tasks, 5, "10 digits, 2 per task")
    if not 0.0 < train_fraction < 1.0:
        raise HATValueError(f"train_fraction must be in (0, 1); got {train_fraction!r}")
    from sklearn.datasets import load_digits  # optional dependency (the "demo" extra)

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(num_tasks):
        train_idx, test_idx = [], []
        for label in (0, 1):
            idx = (y == 2 * t + label).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_train = round(train_fraction * len(idx))
            train_idx.append(idx[:n_train])
            test_idx.append(idx[n_train:])
        # shuffle once more so the classes interleave (evaluation does not care; batching might)
        tr = torch.cat(train_idx)[torch.randperm(sum(len(i) for i in train_idx), generator=g)]
        te = torch.cat(test_idx)
        tasks.append((x[tr], y[tr] - 2 * t, x[te], y[te] - 2 * t))
    return tasks


# Where Debian's dataset-fashion-mnist puts the IDX files (`dpkg -L dataset-fashion-mnist`).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DataNotFoundError(FileNotFoundError):
    """A benchmark's data is not where it was looked for; the message says where and how to get it."""


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (gzipped or not) as a uint8 tensor of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise HATValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = raw[4 + 4 * ndim:]
    if len(data) != math.prod(dims):
        raise HATValueError(f"{path} is truncated: {len(data)} bytes of data for shape {dims}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(dims)


def _find_fashion(data_dir: str | Path | None) -> Path:
    places = [Path(data_dir)] if data_dir is not None else [Path(d) for d in FASHION_MNIST_DIRS]
    for place in places:
        for candidate in (place, place / "fashion-mnist", place / "FashionMNIST" / "raw"):
            if all((candidate / f).exists() or (candidate / (f + ".gz")).exists() for f in _FASHION_FILES):
                return candidate
    looked = ", ".join(str(p) for p in places)
    raise DataNotFoundError(
        f"Fashion-MNIST's IDX files ({', '.join(f + '[.gz]' for f in _FASHION_FILES)}) were not found in {looked}. "
        "On Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist; elsewhere pass --data-dir with the "
        "four files (github.com/zalandoresearch/fashion-mnist)"
    )


def _load_fashion(data_dir: str | Path | None) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST's train images, train labels, test images, test labels as uint8 tensors."""
    root = _find_fashion(data_dir)
    return tuple(_read_idx(root / f if (root / f).exists() else root / (f + ".gz")) for f in _FASHION_FILES)


def _check_num_tasks(num_tasks: Any, most: int, why: str) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or not 1 <= num_tasks <= most:
        raise HATValueError(f"num_tasks must be an int in [1, {most}] ({why}); got {num_tasks!r}")


def split_fashion_mnist(num_tasks: int = 5, data_dir: str | Path | None = None) -> list[Task]:
    """Fashion-MNIST (60k/10k 28x28) as 2-class tasks in class order: task ``t`` is class ``2t``
    (label 0) against ``2t + 1`` (label 1), with the dataset's own train/test split.

    Read from ``data_dir`` or where Debian's ``dataset-fashion-mnist`` installs it.
    ``x`` is ``[N, 1, 28, 28]`` float32 in [0, 1].
    """
    _check_num_tasks(num_tasks, 5, "10 classes, 2 per task")
    x_tr, y_tr, x_te, y_te = _load_fashion(data_dir)
    x_tr = x_tr.unsqueeze(1).float().div_(255)
    x_te = x_te.unsqueeze(1).float().div_(255)
    y_tr, y_te = y_tr.long(), y_te.long()
    tasks = []
    for t in range(num_tasks):
        tr = ((y_tr == 2 * t) | (y_tr == 2 * t + 1)).nonzero().flatten()
        te = ((y_te == 2 * t) | (y_te == 2 * t + 1)).nonzero().flatten()
        tasks.append((x_tr[tr], y_tr[tr] - 2 * t, x_te[te], y_te[te] - 2 * t))
    return tasks


def permuted_fashion_mnist(num_tasks: int = 10, data_dir: str | Path | None = None, seed: int = 0) -> list[Task]:
    """Permuted Fashion-MNIST: every task is the whole 10-class problem with its own fixed
    permutation of the 784 pixels (task 0 unpermuted), so tasks share no input structure and
    compete for capacity. Permutations come from ``seed``. Up to 20 tasks (each about 220 MB)."""
    _check_num_tasks(num_tasks, 20, "one permutation per task; each task holds its own copy of the data")
    x_tr, y_tr, x_te, y_te = _load_fashion(data_dir)
    x_tr = x_tr.reshape(len(x_tr), -1).float().div_(255)
    x_te = x_te.reshape(len(x_te), -1).float().div_(255)
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(num_tasks):
        perm = torch.arange(784) if t == 0 else torch.randperm(784, generator=g)
        tasks.append((x_tr[:, perm].view(-1, 1, 28, 28), y_tr.long(), x_te[:, perm].view(-1, 1, 28, 28), y_te.long()))
    return tasks


_CIFAR = {
    # name: (folder as torchvision extracts it, train files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}


def split_cifar(which: str, num_tasks: int | None = None, data_dir: str | Path | None = None) -> list[Task]:
    """Split CIFAR-10 (5 tasks of 2 classes) or CIFAR-100 (10 tasks of 10 classes) in class order,
    from a local copy of the python-pickle batches as torchvision downloads them
    (``cifar-10-batches-py/`` or ``cifar-100-python/``, in ``data_dir`` or inside it).

    ``x`` is ``[N, 3, 32, 32]`` float32 in [0, 1]; labels within a task are 0..k-1.
    """
    import pickle

    import numpy as np

    folder_name, train_files, test_files, label_key, classes = _CIFAR[which]
    per_task = 2 if which == "cifar10" else 10
    most = classes // per_task
    num_tasks = most if num_tasks is None else num_tasks
    _check_num_tasks(num_tasks, most, f"split-{which}: {per_task} classes per task")
    places = [] if data_dir is None else [Path(data_dir), Path(data_dir) / folder_name]
    root = next((p for p in places if all((p / f).is_file() for f in train_files + test_files)), None)
    if root is None:
        looked = ", ".join(str(p) for p in places) or "nowhere (no --data-dir given)"
        raise DataNotFoundError(
            f"split-{which} needs a local copy of {folder_name}/ ({', '.join(train_files + test_files)}); looked in "
            f"{looked}. Pass --data-dir with the folder torchvision's CIFAR{classes} download extracts "
            "(it cannot be downloaded here)"
        )

    def load(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in files:
            with open(root / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # a local copy the user made: trusted as their file
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)).float().div_(255), torch.from_numpy(np.concatenate(ys))

    x_tr, y_tr = load(train_files)
    x_te, y_te = load(test_files)
    tasks = []
    for t in range(num_tasks):
        lo, hi = t * per_task, (t + 1) * per_task
        tr = ((y_tr >= lo) & (y_tr < hi)).nonzero().flatten()
        te = ((y_te >= lo) & (y_te < hi)).nonzero().flatten()
        tasks.append((x_tr[tr], y_tr[tr] - lo, x_te[te], y_te[te] - lo))
    return tasks


# -- networks -----------------------------------------------------------------------------------
class MLP(nn.Module):
    """Flatten, two ``HATLinear`` + ReLU layers, and one linear head per task.

    Input: a payload with data ``[N, *input_shape]``; output: a payload with ``[N, classes]`` logits.
    """

    def __init__(self, hat_config: HATConfig, classes: int, in_features: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = HATLinear(in_features, hidden, hat_config)
        self.fc2 = HATLinear(hidden, hidden, hat_config)
        self.relu = nn.ReLU()
        self.head = TaskIndexedLinear(hat_config.num_tasks, hidden, classes)

    def forward(self, p: HATPayload) -> HATPayload:
        p = p.forward_by(self.flatten)
        p = self.fc1(p).forward_by(self.relu)
        p = self.fc2(p).forward_by(self.relu)
        return self.head(p)


class CNN(nn.Module):
    """Two ``HATConv2d`` + ``TaskIndexedBatchNorm2d`` + ReLU blocks, a 2x2 max-pool, flatten,
    ``HATLinear`` + ReLU, and one linear head per task.

    Input: a payload with data ``[N, C, H, W]`` (H and W even); output: ``[N, classes]`` logits.
    """

    def __init__(self, hat_config: HATConfig, classes: int, in_channels: int = 1, image_size: tuple[int, int] = (8, 8),
                 width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        n = hat_config.num_tasks
        self.conv1 = HATConv2d(in_channels, width, 3, hat_config, padding=1)
        self.bn1 = TaskIndexedBatchNorm2d(n, width)
        self.conv2 = HATConv2d(width, 2 * width, 3, hat_config, padding=1)
        self.bn2 = TaskIndexedBatchNorm2d(n, 2 * width)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = HATLinear(2 * width * (image_size[0] // 2) * (image_size[1] // 2), hidden, hat_config)
        self.head = TaskIndexedLinear(n, hidden, classes)

    def forward(self, p: HATPayload) -> HATPayload:
        p = self.bn1(self.conv1(p)).forward_by(self.relu)
        p = self.bn2(self.conv2(p)).forward_by(self.relu).forward_by(self.pool)
        p = self.fc(p.forward_by(self.flatten)).forward_by(self.relu)
        return self.head(p)


def build_model(name: str, num_tasks: int, classes_per_task: int, *, s_max: float = 400.0,
                input_shape: Sequence[int] = (1, 8, 8), hidden: int | None = None,
                mask_init: str = "normal") -> nn.Module:
    """A HAT network on payloads: ``"mlp"`` (:class:`MLP`) or ``"cnn"`` (:class:`CNN`).

    ``s_max`` is both the largest training mask scale and the one in the embedding-gradient
    compensation. Initializes weights from the global RNG.
    """
    cfg = HATConfig(num_tasks=num_tasks, max_trn_mask_scale=s_max, grad_comp_factor=s_max, init_strat=mask_init)
    c, h, w = input_shape
    if name in MODELS:
        model = (MLP(cfg, classes_per_task, in_features=c * h * w, hidden=hidden or 256) if name == "mlp"
                 else CNN(cfg, classes_per_task, in_channels=c, image_size=(h, w), hidden=hidden or 64))
        _ensure_root_hook(model)  # payload models too: BatchNorm statistics refreshed when a task ends
        return model
    if name.startswith("hat_"):
        return _timm_model(name, cfg, classes_per_task, (c, h, w))
    raise HATValueError(f"model must be one of {MODELS} or a hat_* timm model; got {name!r}")


def timm_model_names() -> list[str]:
    """The ``hat_*`` models registered in timm, or [] without timm."""
    try:
        import timm

        import hat.timm_models  # noqa: F401  (registers them)
    except ImportError:
        return []
    return timm.list_models("hat_*")


def _timm_model(name: str, cfg: HATConfig, classes: int, shape: tuple[int, int, int]) -> nn.Module:
    names = timm_model_names()
    if name not in names:
        raise HATValueError(f"model {name!r} is not a registered hat_* timm model "
                         f"({', '.join(names) or 'timm not installed'})")
    import timm

    c, h, w = shape
    kwargs: dict[str, Any] = dict(hat_config=cfg, num_classes=classes, in_chans=c)
    if "vit" in name:  # a patch grid of about 4x4 on the benchmark's images
        kwargs.update(img_size=(h, w), patch_size=max(1, min(h, w) // 4))
    return timm.create_model(name, **kwargs)


def build_optimizer(name: str, params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``"adamw"`` (weight decay 0.01), ``"adam"`` or ``"sgd"`` (momentum 0.9)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise HATValueError(f"optimizer must be one of {OPTIMIZERS}; got {name!r}")


# -- training and evaluation --------------------------------------------------------------------
def train_task(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple[torch.Tensor, torch.Tensor],
               task_id: int | None, epochs: int, batch_size: int, s_max: float, reg: float,
               generator: torch.Generator, progress: Any = None, task_index: int = 0) -> None:
    """Train ``task_id`` on ``data = (x, y)`` with cross-entropy plus ``reg`` times HAT's mask
    regularizer, the mask scale annealed linearly from ``1/s_max`` to ``s_max`` within each epoch
    (the paper's schedule): :func:`hat.training.train_task` on a payload model.

    ``task_id=None`` trains the plain network (no masks, no protection, no regularizer): fine-tuning.
    Earlier tasks are protected by ``hat``'s optimizer step hooks, whatever the optimizer.
    ``progress``: None, or ``(task_index, epoch, batches) -> bar`` with ``update()`` and ``close()``.
    """
    training.train_task(model, optimizer, data, task_id, epochs=epochs, batch_size=batch_size, generator=generator,
                        forward="payload", scale_strat="linear", max_scale=s_max, reg_strength=reg,
                        on_batch=None if progress is None else _bars(progress, task_index))


def _bars(progress: Any, task_index: int) -> Any:
    """An ``on_batch`` callback that shows each epoch as a ``progress`` bar."""
    bar = None

    def on_batch(step: training.TrainStep) -> None:
        nonlocal bar
        if step.batch == 0:
            bar = progress(task_index, step.epoch, step.num_batches)
        bar.update()
        if step.batch == step.num_batches - 1:
            bar.close()

    return on_batch


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, task_id: int | None, batch_size: int = 1024) -> float:
    """Accuracy in [0, 1] of ``task_id`` with the hard (binary) masks, in eval mode
    (:func:`hat.training.evaluate` on a payload model).

    Computed from integer counts, so equal predictions give bit-equal accuracies.
    """
    return training.evaluate(model, (x, y), task_id, forward="payload", batch_size=batch_size)


def _class_offsets(tasks: Sequence[Task]) -> list[int]:
    """Per task, how many classes the tasks before it have (labels ``0..C-1`` within each)."""
    offsets, offset = [], 0
    for _, y_tr, _, y_te in tasks:
        offsets.append(offset)
        offset += int(max(y_tr.max(), y_te.max())) + 1
    return offsets


def class_incremental(tasks: Sequence[Task]) -> list[Task]:
    """``tasks`` with every label made global: task ``t``'s labels shifted by the classes of the
    tasks before it (the one shared head of a class-incremental baseline learns all of them)."""
    return [(x_tr, y_tr + o, x_te, y_te + o) for (x_tr, y_tr, x_te, y_te), o in zip(tasks, _class_offsets(tasks))]


@torch.no_grad()
def evaluate_class_incremental(model: nn.Module, tasks: Sequence[Task], method: Method = "hat",
                               batch_size: int = 1024) -> dict[str, Any]:
    """Class-incremental accuracy after training ``tasks`` (no task id given at test time).

    ``"hat"``: :func:`hat.predict` (task prediction from each task's recorded statistics, then
    that task's head), every task's classes numbered after the tasks before it; ``"finetune"``:
    the shared head's argmax over the classes of ``tasks`` (labels already global, as
    :func:`class_incremental` gives). Returns ``per_task`` (accuracy on each task's test samples),
    ``accuracy`` (over all of them) and, for HAT, ``task_prediction`` (fractions in [0, 1])."""
    import hat

    correct, task_right, total, per_task = 0, 0, 0, []
    offsets = _class_offsets(tasks)
    seen = 1 + max(int(max(t[1].max(), t[3].max())) for t in tasks)  # fine-tuning: labels are global already
    for k, (_, _, x_te, y_te) in enumerate(tasks):
        if method == "hat":
            pred = hat.predict(model, x_te, class_offsets=offsets, batch_size=batch_size)
            right = pred.global_class == y_te + offsets[k]
            task_right += int((pred.task_id == k).sum())
        else:
            logits = training.predict(model, x_te, None, batch_size=batch_size)[:, :seen]
            right = logits.argmax(1) == y_te
        correct += int(right.sum())
        total += len(y_te)
        per_task.append(int(right.sum()) / len(y_te))
    out: dict[str, Any] = {"per_task": per_task, "accuracy": correct / total}
    if method == "hat":
        out["task_prediction"] = task_right / total
    return out


def run_sequence(model: nn.Module, optimizer: torch.optim.Optimizer, tasks: Sequence[Task], *,
                 method: Method = "hat", epochs: int = 5, batch_size: int = 32, s_max: float = 400.0,
                 reg: float = 0.75, generator: torch.Generator | None = None,
                 progress: Any = None, start: int = 0, matrix: list[list[float]] | None = None,
                 after_task: Any = None, budget: float | None = None,
                 train_with: nn.Module | None = None) -> list[list[float]]:
    """Train ``tasks`` in order with one optimizer; after each, evaluate every task seen so far.

    ``method="hat"`` trains and evaluates task ``t`` as ``task_id=t`` (its masks and its head);
    ``"finetune"`` uses ``task_id=None`` throughout: the plain network and the shared head, the
    baseline that forgets. Batch order comes from ``generator`` (None: one seeded with 0).
    ``progress``: None, or ``(task, epoch, batches) -> bar`` with ``update()`` and ``close()``
    (a tqdm bar, say). ``start``/``matrix``: continue a sequence whose first ``start`` tasks are
    done (a resumed run); ``after_task(t, matrix)`` is called after each task is evaluated and
    may return True to stop there. ``budget`` (HAT only): each task starts with every free unit
    on and its free weights re-initialized (``hat.compress.switch_on_free_units``); after it,
    ``hat.compress`` releases the units it added beyond ``budget`` times its fair share of the free
    units, and one more epoch (``hat.training.finetune_task``) trains it at its final masks.
    ``train_with``: the module training calls (a ``DistributedDataParallel`` wrapping ``model``;
    default ``model``); evaluation calls ``model`` itself.
    Returns the accuracy matrix, row ``t`` holding ``t + 1`` entries.
    """
    if method not in METHODS:
        raise HATValueError(f"method must be one of {METHODS}; got {method!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    matrix = [list(row) for row in matrix] if matrix is not None else []
    for t, (x_train, y_train, _, _) in enumerate(tasks):
        if t < start:
            continue
        task_id = t if method == "hat" else None
        if budget is not None and task_id is not None:
            from hat.compress import switch_on_free_units

            switch_on_free_units(model, task_id, reinit=True)
        train_task(train_with or model, optimizer, (x_train, y_train), task_id, epochs, batch_size, s_max, reg,
                   generator, progress, t)
        if budget is not None and task_id is not None:
            from hat.compress import compress

            compress(model, task_id, (x_train, y_train), budget=budget)
            training.finetune_task(model, optimizer, (x_train, y_train), task_id, batch_size=batch_size,
                                   generator=generator, max_scale=s_max)
        matrix.append([evaluate(model, x_te, y_te, k if method == "hat" else None)
                       for k, (_, _, x_te, y_te) in enumerate(tasks[:t + 1])])
        if after_task is not None and after_task(t, matrix):
            break
    return matrix


# -- metrics ------------------------------------------------------------------------------------
def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after the last one trained (the mean of the last row)."""
    last = matrix[-1]
    return sum(last) / len(last)


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): ``mean over k < T-1 of acc[T-1][k] - acc[k][k]``.

    Negative means forgetting; 0.0 when fewer than two tasks were trained.
    """
    last = len(matrix) - 1
    if last < 1:
        return 0.0
    return sum(matrix[last][k] - matrix[k][k] for k in range(last)) / last


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Average forgetting (Chaudhry et al., 2018): ``mean over k < T-1 of max over t < T-1 of
    acc[t][k] - acc[T-1][k]``; 0.0 when fewer than two tasks were trained."""
    last = len(matrix) - 1
    if last < 1:
        return 0.0
    return sum(max(matrix[t][k] for t in range(k, last)) - matrix[last][k] for k in range(last)) / last


def capacity_report(model: nn.Module) -> dict[str, dict[str, Any]]:
    """:func:`hat.capacity` as plain data for ``results.json``, keyed by layer name (the model
    itself, when it is a HAT layer, as ``"(model)"``)::

        {"fc1": {"units": 256,
                 "tasks": [{"task": 0, "used": 118, "shared": 0, "added": 118}, ...],
                 "free": 8}, ...}

    Per trained task in training order: ``used = shared + added`` (shared: also used by an earlier
    task); per layer ``free + sum of added = units``.
    """
    return {layer.name or "(model)": {"units": layer.units, "tasks": [t._asdict() for t in layer.tasks],
                                      "free": layer.free}
            for layer in layer_capacity(model)}


