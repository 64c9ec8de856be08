"""The training state a HAT model keeps between steps, against its plain twin.

    python benchmarks/memory.py               # the CNN and hat_resnet18s, AdamW (default), batch 8

After a few steps of task 1 with task 0 trained (AdamW, torch's default implementation), every
distinct tensor storage that lives between steps is counted once (by its device and
``untyped_storage().data_ptr()``), in the first category that reaches it:

- params, grads (``.grad`` of the parameters), optimizer state, buffers;
- HAT extra: tensors in the modules' ``__dict__`` (mask caches, probes, unit maps, the inputs a
  converted model keeps to refresh its BatchNorm statistics) and in ``hat._runtime.RUNTIME``
  (the optimizer's snapshot buffers and step plans, the mask groups with the autograd context of
  their cached masks, the one-hot probe gradients), found by walking those objects.

The plain twin is ``hat.unconvert(model, 0)``: the same network in torch.nn layers, trained the
same way. As a check, every tensor the garbage collector knows is matched against the
categories of both models; what none reaches is printed as "unattributed". On a CUDA machine
the models live on the GPU and the peak ``torch.cuda.max_memory_allocated`` of one step of each
is printed too.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gc
import os
import sys
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import hat
import hat.timm_models  # registers hat_resnet18s with timm
from hat import HATConfig
from hat._runtime import RUNTIME
from hat.tracking.tracked import Split, task_modules

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import PlainCNN

GOAL = 1.30  # the goal for HAT / plain
SCALE = 50.0
MB = 1e6  # the issue counts in 10^6 bytes
CATEGORIES = ("params", "grads", "optimizer state", "buffers", "HAT extra")


class Ledger:
    """Bytes per category (and, for HAT's state, per place), each storage counted once."""

    def __init__(self, seen: dict[tuple[str, int], str] | None = None) -> None:
        self.seen: dict[tuple[str, int], str] = {} if seen is None else seen  # storage -> category
        self.bytes: collections.Counter[str] = collections.Counter()
        self.places: collections.Counter[str] = collections.Counter()  # HAT extra by where it lives

    def add(self, category: str, t: torch.Tensor | None, place: str = "") -> None:
        if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in self.seen:
            return
        self.seen[key] = category
        self.bytes[category] += storage.nbytes()
        if place:
            self.places[place] += storage.nbytes()

    def total(self) -> int:
        return sum(self.bytes.values())


def tensors_in(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list[torch.Tensor]:
    """The tensors ``obj`` holds: through containers, hat's own objects (dataclasses, slotted
    classes, NamedTuples), a tensor's ``.grad`` and the Python context of custom autograd nodes
    (``ctx.e = ...``, which outlives the backward); not through modules (counted on their own) or
    weak references."""
    seen = set() if seen is None else seen
    if depth > 16 or id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out = [obj]
        if obj.is_leaf:
            out += tensors_in(obj.grad, depth + 1, seen)
        out += _graph_tensors(obj.grad_fn, depth + 1, seen)
        return out
    if isinstance(obj, (nn.Module, weakref.ref, weakref.WeakSet, weakref.WeakKeyDictionary, type)) or callable(obj):
        return []
    items: list[Any] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            items += [k, v]
    elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        items = list(obj)
    elif type(obj).__module__.split(".")[0] == "hat":
        items = list(getattr(obj, "__dict__", {}).values())
        for cls in type(obj).__mro__:
            for name in getattr(cls, "__slots__", ()):
                items.append(getattr(obj, name, None))
    out = []
    for item in items:
        out += tensors_in(item, depth + 1, seen)
    return out


def _graph_tensors(node: Any, depth: int, seen: set[int]) -> list[torch.Tensor]:
    """Tensors held as attributes of the custom autograd nodes reachable from ``node``."""
    if node is None or depth > 16 or id(node) in seen:
        return []
    seen.add(id(node))
    out = []
    for value in getattr(node, "__dict__", {}).values():
        out += tensors_in(value, depth + 1, seen)
    for nxt, _ in getattr(node, "next_functions", ()):
        out += _graph_tensors(nxt, depth + 1, seen)
    return out


def account(model: nn.Module, opt: torch.optim.Optimizer, ledger: Ledger) -> Ledger:
    for p in model.parameters():
        ledger.add("params", p)
    for p in model.parameters():
        ledger.add("grads", p.grad)
    for state in opt.state.values():
        for t in tensors_in(state):
            ledger.add("optimizer state", t)
    for b in model.buffers():
        ledger.add("buffers", b)
    modules = task_modules(model)
    if not modules:
        return ledger
    # -- HAT's state: the runtime's caches for this optimizer, then what the modules keep -----------
    for t in tensors_in(RUNTIME.buffers.get(opt, {})):
        ledger.add("HAT extra", t, "snapshot buffers (RUNTIME.buffers[optimizer], hat/protect/hooks.py _buffer)")
    for m in model.modules():
        skip = ("_parameters", "_buffers", "_modules")
        for key, value in m.__dict__.items():
            if key not in skip:
                for t in tensors_in(value):
                    ledger.add("HAT extra", t, f"module.__dict__['{key}']")
    for t in tensors_in(RUNTIME.plans.get(opt)):
        ledger.add("HAT extra", t, "step plans (RUNTIME.plans[optimizer]: _row_split masks)")
    configs = {id(m.hat_config) for m in modules if hasattr(m, "hat_config")}
    for key, (ref, group) in list(RUNTIME.mask_groups.items()):
        if key in configs and ref() is not None:
            for t in tensors_in(group):
                ledger.add("HAT extra", t, "mask groups (RUNTIME.mask_groups: cached masks, their ctx)")
    for t in tensors_in(RUNTIME.one_hots):
        ledger.add("HAT extra", t, "one-hot probe gradients (RUNTIME.one_hots)")
    for t in tensors_in(RUNTIME.pending.get(opt)):
        ledger.add("HAT extra", t, "pending step (RUNTIME.pending[optimizer])")
    return ledger


def live_tensors(device: torch.device) -> tuple[list[torch.Tensor], set[int]]:
    """Every tensor on ``device`` the garbage collector knows, and the ids of those a ``Split``
    (hat's protection masks) holds."""
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        objects = gc.get_objects()
        tensors = [o for o in objects if isinstance(o, torch.Tensor) and o.device == device]
        in_splits = {id(t) for o in objects if isinstance(o, Split) for t in o}
    return tensors, in_splits


def cached_row_splits(model: nn.Module, ledger: Ledger, device: torch.device) -> None:
    """The row masks that ``hat.tracking.tracked._row_split`` (a process-wide functools.lru_cache,
    whose entries cannot be listed) keeps for earlier combinations of trained tasks: tensors that a
    ``Split`` holds, of the shape of one of ``model``'s task-indexed parameters."""
    shapes = {tuple(p.shape) for m in task_modules(model) for n in m._hat_row_params
              if (p := m._parameters.get(n)) is not None}
    tensors, in_splits = live_tensors(device)
    for t in tensors:
        if tuple(t.shape) in shapes and id(t) in in_splits:
            ledger.add("HAT extra", t, "row masks in _row_split's lru_cache (hat/tracking/tracked.py)")


def build(network: str, tasks: int, classes: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cfg = HATConfig(num_tasks=tasks)
    if network == "cnn":
        model = hat.convert(PlainCNN(classes), cfg)
    else:
        import timm

        model = timm.create_model(network, num_classes=classes, hat_config=cfg)
    model.to(device)
    return model, hat.unconvert(model, 0)


def stepper(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
            hat_model: bool) -> Callable[[int], None]:
    def step(task: int) -> None:
        if hat_model:
            hat.set_task(model, task, mask_scale=SCALE)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def measure(network: str, args: argparse.Namespace, device: torch.device) -> None:
    model, plain = build(network, args.tasks, args.classes, device)
    opt_hat = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, args.classes, (args.batch_size,), device=device)
    step_hat, step_plain = stepper(model, opt_hat, x, y, True), stepper(plain, opt_plain, x, y, False)
    for _ in range(args.steps):
        step_hat(0)  # task 0 becomes trained: task 1's steps protect it
        step_plain(0)
    for _ in range(args.steps):
        step_hat(1)
        step_plain(1)
    gc.collect()
    seen: dict[tuple[str, int], str] = {}
    h = account(model, opt_hat, Ledger(seen))
    p = account(plain, opt_plain, Ledger(seen))
    inputs = Ledger(seen)
    inputs.add("inputs", x)
    inputs.add("inputs", y)
    cached_row_splits(model, h, device)
    others = Ledger(seen)
    tensors, in_splits = live_tensors(device)
    for t in tensors:
        others.add("unattributed", t, "row masks of models measured before, still in _row_split's lru_cache"
                   if id(t) in in_splits else "other")

    ratio = h.total() / p.total()
    print(f"\n== {network}, AdamW (default), after {args.steps} steps of task 0 and {args.steps} of task 1")
    print(f"   {'MB':18s} {'HAT':>9s} {'plain':>9s}")
    for c in CATEGORIES:
        print(f"   {c:18s} {h.bytes[c] / MB:9.3f} {p.bytes[c] / MB:9.3f}")
    verdict = "met" if ratio <= GOAL else "not met"
    print(f"   {'total':18s} {h.total() / MB:9.3f} {p.total() / MB:9.3f}   ratio {ratio:.2f}x  "
          f"(goal <= {GOAL:.2f}x: {verdict})")
    print("   HAT extra by where it lives (MB):")
    for place, n in h.places.most_common():
        print(f"     {n / MB:9.3f}  {place}")
    # the BatchNorm refresh keeps the task's latest inputs, up to a cap: what that cap costs here
    from hat.convert.statistics import KEEP_BYTES, KEEP_SAMPLES

    kept_now = h.places["module.__dict__['_hat_stats_pending']"]
    capped = min(KEEP_SAMPLES * x.nbytes // args.batch_size, KEEP_BYTES)  # the model's inputs, not the labels
    print(f"   of which inputs kept for the BatchNorm refresh: {kept_now / MB:.3f} MB after {args.steps} steps; "
          f"after {KEEP_SAMPLES // args.batch_size} or more steps {capped / MB:.3f} MB (at most {KEEP_SAMPLES} "
          f"samples), total {(h.total() - kept_now + capped) / MB:.3f} MB, ratio "
          f"{(h.total() - kept_now + capped) / p.total():.2f}x; without them {(h.total() - kept_now) / MB:.3f} MB, "
          f"ratio {(h.total() - kept_now) / p.total():.2f}x")
    print(f"   unattributed live tensor storage on {device} (neither model, nor the inputs): "
          f"{others.total() / MB:.3f} MB")
    for place, n in others.places.most_common():
        print(f"     {n / MB:9.3f}  {place}")
    if device.type == "cuda":
        peak(step_hat, step_plain, h.total(), p.total())
    else:
        print("   peak CUDA memory of one step: skipped (no CUDA device: the models ran on the CPU)")


def peak(step_hat: Callable[[int], None], step_plain: Callable[[int], None], hat_bytes: int,
         plain_bytes: int) -> None:
    """Peak allocation of one step of each; both models are resident, so the peak of a model alone
    is its persistent state plus what its step allocates above the allocation it started from."""
    out = {}
    for name, step, persistent in (("HAT", step_hat, hat_bytes), ("plain", step_plain, plain_bytes)):
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(1)
        torch.cuda.synchronize()
        top = torch.cuda.max_memory_allocated()
        out[name] = persistent + top - start
        print(f"   CUDA, one step of {name:5s}: max_memory_allocated {top / MB:9.3f} MB (both models resident), "
              f"above its start {(top - start) / MB:8.3f} MB; alone: {out[name] / MB:9.3f} MB")
    print(f"   CUDA peak of one step alone, HAT / plain: {out['HAT'] / out['plain']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=5, help="HATConfig(num_tasks=...)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="steps of task 0, then as many of task 1")
    parser.add_argument("--networks", nargs="+", default=["cnn", "hat_resnet18s"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # tensors report cuda:N
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"torch {torch.__version__}, {datetime.date.today()}, 1 thread, {device}, batch {args.batch_size}, "
          f"3x32x32, num_tasks={args.tasks}, task 1 training with task 0 protected, mask_scale={SCALE}")
    for network in args.networks:
        measure(network, args, device)


if __name__ == "__main__":
    main()
