"""How many aten operations one training step of a HAT model dispatches, against its plain twin.

    python benchmarks/ops.py                  # both networks, fused and default AdamW, batch 8
    python benchmarks/ops.py --where          # also: the line of hat/ that issued each extra op

On a CPU at small batches a step costs about as much in dispatch as in arithmetic, so the count
of aten operations (forward, backward and optimizer step, counted by a TorchDispatchMode) is
the overhead that does not shrink with the machine. Views (select, detach, view ...) are
counted too, and also printed apart: they cost dispatch on the host but launch no GPU kernel.
Networks:

- ``cnn``: the CNN of benchmarks/overhead.py (three conv-BN-ReLU-pool blocks, two linear layers)
  built plain and turned into a HAT model with ``hat.convert``;
- ``hat_resnet18s`` (hat.timm_models);
- ``cnn-payload`` (``--payload``): overhead.py's hand-built HATCNN, which takes HATPayloads,
  against overhead.py's PlainCNN.

The HAT model trains task 1 with task 0 trained, so the protection does its full work; it
selects the task with ``hat.set_task(model, 1, mask_scale=50)`` before every forward. Its plain
twin is ``hat.unconvert(model, 0)`` (torch.nn layers only), trained the same way. Counts are
taken after warm-up steps: the first forward of a HAT model traces it, and the first step of a
task builds the step's protection plan and masks.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import hat
import hat.timm_models  # registers hat_resnet18s with timm
from hat import HATConfig, HATPayload

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import HATCNN, PlainCNN, copy_weights

GOAL = 1.25  # the goal for HAT / plain with fused AdamW
SCALE = 50.0
PHASES = ("forward", "backward", "step")
HAT_DIR = os.path.dirname(os.path.abspath(hat.__file__)) + os.sep
REPO = os.path.dirname(HAT_DIR.rstrip(os.sep)) + os.sep


class OpCounter(TorchDispatchMode):
    """Counts the aten overload packets (``aten.select``, ``aten.mul`` ...) dispatched per phase of
    a step; with ``where``, also the innermost line of the ``hat`` package on the Python stack
    that issued each one ("autograd" where none is: the backward of a forward op, or torch's own)."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.phase = PHASES[0]
        self.counts: dict[str, collections.Counter[str]] = {p: collections.Counter() for p in PHASES}
        self.where = where
        self.sites: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.views = 0  # ops that return a view of their input (no kernel on a GPU)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        self.counts[self.phase][name] += 1
        self.views += func.is_view
        if self.where:
            self.sites[(name, self.phase, _hat_site())] += 1
        return func(*args, **(kwargs or {}))

    def total(self) -> collections.Counter[str]:
        out: collections.Counter[str] = collections.Counter()
        for c in self.counts.values():
            out.update(c)
        return out


def _hat_site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(HAT_DIR):
            return f"{path[len(REPO):]}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "(no hat frame: autograd / torch)"


Step = Callable[[OpCounter | None], None]


def adamw(params: Any, fused: bool) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused or None)


def make_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              forward: Callable[[], torch.Tensor]) -> Step:
    def step(counter: OpCounter | None = None) -> None:
        def phase(name: str) -> None:
            if counter is not None:
                counter.phase = name

        phase("forward")
        loss = F.cross_entropy(forward(), y)
        phase("backward")
        opt.zero_grad()
        loss.backward()
        phase("step")
        opt.step()

    return step


def set_task_steps(model: nn.Module, plain: nn.Module, fused: bool, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[Step, Step, Step]:
    """(HAT step of task 0, HAT step of task 1, plain step), the HAT model selecting its task
    with hat.set_task."""
    opt_hat, opt_plain = adamw(model.parameters(), fused), adamw(plain.parameters(), fused)

    def forward_task(task: int) -> Callable[[], torch.Tensor]:
        def forward() -> torch.Tensor:
            hat.set_task(model, task, mask_scale=SCALE)
            return model(x)
        return forward

    return (make_step(model, opt_hat, x, y, forward_task(0)), make_step(model, opt_hat, x, y, forward_task(1)),
            make_step(plain, opt_plain, x, y, lambda: plain(x)))


def build(network: str, tasks: int, classes: int, fused: bool, batch: int) -> tuple[Step, Step, Step]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, classes, (batch,))
    cfg = HATConfig(num_tasks=tasks)
    if network == "cnn-payload":
        model = HATCNN(cfg, classes)
        plain = PlainCNN(classes)
        copy_weights(plain, model)
        opt_hat, opt_plain = adamw(model.parameters(), fused), adamw(plain.parameters(), fused)

        def forward_task(task: int) -> Callable[[], torch.Tensor]:
            return lambda: model(HATPayload(x, task_id=task, mask_scale=SCALE)).data

        return (make_step(model, opt_hat, x, y, forward_task(0)), make_step(model, opt_hat, x, y, forward_task(1)),
                make_step(plain, opt_plain, x, y, lambda: plain(x)))
    if network == "cnn":
        model = hat.convert(PlainCNN(classes), cfg)
    else:
        import timm

        model = timm.create_model(network, num_classes=classes, hat_config=cfg)
    plain = hat.unconvert(model, 0)
    return set_task_steps(model, plain, fused, x, y)


def count(network: str, fused: bool, args: argparse.Namespace) -> tuple[OpCounter, OpCounter, list[int]]:
    """Counters of one steady-state step of the HAT model (task 1) and of its plain twin, and the
    HAT totals of further counted steps (equal to the first when the step is steady).

    Every counted step follows an uncounted one. Under a TorchDispatchMode, torch's CPU
    ``_foreach_clamp_min_``/``_foreach_clamp_max_`` (the embedding clamp after each step) leave
    the tensors' version counters as they are, and ``_fused_adamw_`` never bumps them: the next
    step would then take its masks from hat.masks.group's cache (stamped with ``_version``) and
    skip the mask computation a real step does."""
    step0, step1, step_plain = build(network, args.tasks, args.classes, fused, args.batch_size)
    for _ in range(args.warmup):
        step0()  # task 0 becomes trained: task 1's steps protect it
        step_plain()
    for _ in range(args.warmup):
        step1()
        step_plain()
    hat_counter, plain_counter = OpCounter(args.where), OpCounter(args.where)
    with hat_counter:
        step1(hat_counter)
    with plain_counter:
        step_plain(plain_counter)
    again = []
    for _ in range(2):
        step1()
        c = OpCounter()
        with c:
            step1(c)
        again.append(sum(c.total().values()))
    return hat_counter, plain_counter, again


def report(network: str, fused: bool, hat_c: OpCounter, plain_c: OpCounter, again: list[int], top: int,
           where: bool) -> None:
    # torch's default is foreach only where every tensor is on CUDA: on a CPU a loop over the parameters
    which = "AdamW(fused=True)" if fused else "AdamW (default: a for-loop on CPU, foreach on CUDA)"
    h, p = hat_c.total(), plain_c.total()
    nh, np_ = sum(h.values()), sum(p.values())
    ratio = nh / np_
    goal = f"goal <= {GOAL:.2f}x: {'met' if ratio <= GOAL else 'not met'}" if fused else "(goal is for fused AdamW)"
    print(f"\n== {network}, {which}: HAT {nh} ops, plain {np_} ops, ratio {ratio:.2f}x  {goal}")
    phases = ", ".join(f"{ph} {sum(hat_c.counts[ph].values())} vs {sum(plain_c.counts[ph].values())}"
                       for ph in PHASES)
    print(f"   per phase (HAT vs plain): {phases}")
    kh, kp = nh - hat_c.views, np_ - plain_c.views
    print(f"   of which views (select, detach ...: no kernel on a GPU): HAT {hat_c.views}, plain {plain_c.views}; "
          f"other ops HAT {kh}, plain {kp}, ratio {kh / kp:.2f}x")
    steady = "steady" if all(a == nh for a in again) else "NOT steady"
    print(f"   HAT totals of two more counted steps: {', '.join(map(str, again))} ({steady})")
    diff = sorted(set(h) | set(p), key=lambda k: (-(h[k] - p[k]), k))[:top]
    print(f"   top {top} by HAT - plain:")
    print(f"   {'op':34s} {'HAT':>5s} {'plain':>5s} {'extra':>5s}   HAT per phase (fwd/bwd/step)")
    for k in diff:
        per = "/".join(str(hat_c.counts[ph][k]) for ph in PHASES)
        print(f"   {k:34s} {h[k]:5d} {p[k]:5d} {h[k] - p[k]:5d}   {per}")
    if where:
        print("   where the HAT step issued the top ops (op, phase, innermost hat/ line: count):")
        for k in diff[:max(8, top // 2)]:
            sites = [(s, n) for s, n in hat_c.sites.items() if s[0] == k]
            for (op, ph, site), n in sorted(sites, key=lambda t: -t[1])[:6]:
                print(f"     {op:26s} {ph:8s} {site}: {n}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=5, help="HATConfig(num_tasks=...)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps of task 0, then as many of task 1, uncounted")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--networks", nargs="+", default=["cnn", "hat_resnet18s"],
                        help="cnn, hat_resnet18s (or another hat_* timm model), cnn-payload")
    parser.add_argument("--payload", action="store_true", help="also overhead.py's hand-built payload CNN")
    parser.add_argument("--where", action="store_true", help="the hat/ line that issued each of the top ops")
    args = parser.parse_args()
    torch.set_num_threads(1)
    networks = args.networks + (["cnn-payload"] if args.payload and "cnn-payload" not in args.networks else [])
    print(f"torch {torch.__version__}, {datetime.date.today()}, 1 thread, batch {args.batch_size}, 3x32x32, "
          f"num_tasks={args.tasks}, task 1 training with task 0 protected, mask_scale={SCALE}")
    for network in networks:
        for fused in (True, False):
            hat_c, plain_c, again = count(network, fused, args)
            report(network, fused, hat_c, plain_c, again, args.top, args.where)


if __name__ == "__main__":
    main()
