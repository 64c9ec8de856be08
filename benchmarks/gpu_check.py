"""On a CUDA machine: the central promise on the GPU, eager and compiled, the step overhead, the
peak memory of a step, and DistributedDataParallel.

    python benchmarks/gpu_check.py            # needs a CUDA GPU, timm and scikit-learn
    python benchmarks/gpu_check.py --cpu      # a dry run of every check on the CPU (small, no GPU figures)
    python benchmarks/gpu_check.py --ddp-only # the DDP check alone

1. hat_resnet18s on the GPU, AdamW with weight decay, one optimizer: task 0's eval logits are
   bit-identical after task 1 trains; the same under torch.compile (inductor), where switching
   task and scale must not recompile.
2. Train-step time of hat_resnet18s against its plain twin (hat.unconvert: the same weights in
   torch.nn layers), batch 128 at 32x32, CUDA-synchronized, median of paired ratios: eager with
   AdamW's default (foreach) and fused implementations, then both models under
   ``torch.compile`` (default mode, and ``mode="reduce-overhead"``: CUDA graphs; where a mode
   fails with HAT's step hooks the error is printed instead of a ratio), fused AdamW.
3. Peak ``torch.cuda.max_memory_allocated`` of one training step of each model, alone on the GPU.
4. DistributedDataParallel, 2 processes: nccl with one GPU each where the machine has 2, else
   gloo on the CPU. A converted CNN with BatchNorm trains 2 digit tasks, each rank on its shard:
   parameters identical across ranks, task 0's eval logits bit-identical on every rank.
"""

from __future__ import annotations

import datetime
import gc
import os
import pathlib
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

import hat
import hat.timm_models
from hat import HATConfig


def digits_images(device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=32, mode="nearest").expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target)
    tasks = []
    for t in range(2):
        rows = (y == 2 * t) | (y == 2 * t + 1)
        tasks.append((x[rows][:256].to(device), (y[rows][:256] - 2 * t).to(device)))
    return tasks


def invariant(device: torch.device, compile_it: bool) -> bool:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=2), num_classes=2).to(device)
    call = torch.compile(model) if compile_it else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    tasks = digits_images(device)

    def train(task: int, steps: int = 20) -> None:
        x, y = tasks[task]
        model.train()
        for s in range(steps):
            idx = torch.arange(s * 32, s * 32 + 32, device=device) % len(x)
            hat.set_task(model, task, mask_scale=1.0 + 399.0 * s / (steps - 1))
            loss = F.cross_entropy(call(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def logits(task: int) -> torch.Tensor:
        model.eval()
        with hat.task(model, task):
            out = call(tasks[0][0])
        model.train()
        return out

    train(0, 3)  # the first compiles (training and evaluation graphs) happen here
    logits(0)
    if compile_it:
        torch._dynamo.config.error_on_recompile = True
    train(0)
    before = logits(0)
    train(1)
    same = torch.equal(logits(0), before)
    acc = (logits(0).argmax(1) == tasks[0][1]).float().mean().item()
    torch._dynamo.config.error_on_recompile = False
    print(f"{'compiled' if compile_it else 'eager':8s} task 0 logits bit-identical after task 1: {same}  "
          f"(task 0 accuracy {acc:.3f})")
    return same


def _twins(device: torch.device, fused: bool) -> tuple[Any, Any, Any, Any]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5), num_classes=10).to(device)
    plain = hat.unconvert(model, None)
    kw: dict[str, Any] = dict(lr=1e-3, weight_decay=0.01, fused=True) if fused else dict(lr=1e-3, weight_decay=0.01)
    return model, plain, torch.optim.AdamW(model.parameters(), **kw), torch.optim.AdamW(plain.parameters(), **kw)


def _steppers(device: torch.device, fused: bool, mode: str | None, batch: int) -> tuple[Any, Any]:
    """One training step of HAT (task 1, task 0 trained) and one of its plain twin; ``mode``:
    None eager, else the torch.compile mode of both models."""
    model, plain, opt_hat, opt_plain = _twins(device, fused)
    call_hat, call_plain = model, plain
    if mode is not None:
        call_hat = torch.compile(model, mode=None if mode == "default" else mode)
        call_plain = torch.compile(plain, mode=None if mode == "default" else mode)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step_hat(task: int = 1) -> None:
        hat.set_task(model, task, mask_scale=50.0)
        loss = F.cross_entropy(call_hat(x), y)
        opt_hat.zero_grad()
        loss.backward()
        opt_hat.step()

    def step_plain() -> None:
        loss = F.cross_entropy(call_plain(x), y)
        opt_plain.zero_grad()
        loss.backward()
        opt_plain.step()

    for _ in range(5):
        step_hat(0)
        step_plain()
    for _ in range(5):  # compiled: the graphs of task 1 (the same ones: the task is a buffer) warm up
        step_hat()
        step_plain()
    return step_hat, step_plain


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_ratio(device: torch.device, fused: bool, mode: str | None = None, repeats: int = 40,
               batch: int = 128) -> float:
    step_hat, step_plain = _steppers(device, fused, mode, batch)
    ratios = []
    for i in range(repeats):
        order = (step_hat, step_plain) if i % 2 == 0 else (step_plain, step_hat)
        times = {}
        for fn in order:
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[fn] = time.perf_counter() - t0
        ratios.append(times[step_hat] / times[step_plain])
    return statistics.median(ratios)


def peak_memory(device: torch.device, batch: int = 128) -> None:
    """Peak allocated memory of one training step of each model with only that model on the GPU."""
    out = {}
    for name in ("HAT", "plain"):
        step_hat, step_plain = _steppers(device, True, None, batch)
        step = step_hat if name == "HAT" else step_plain
        del step_hat, step_plain
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        out[name] = torch.cuda.max_memory_allocated()
        del step
        gc.collect()
        torch.cuda.empty_cache()
    print(f"peak memory of one training step (fused AdamW, batch {batch}, the other model freed): HAT "
          f"{out['HAT'] / 1e6:.1f} MB, plain {out['plain'] / 1e6:.1f} MB, {out['HAT'] / out['plain']:.2f}x")


def _ddp_worker(rank: int, world: int, port: int, backend: str, out: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from hat.app.experiment import split_digits

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 64, 2))
    model = hat.convert(plain, HATConfig(num_tasks=2)).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if backend == "nccl" else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.01)
    tasks = [[t.to(device) for t in task] for task in split_digits(2)]
    x_eval = tasks[0][2]
    for t in range(2):
        x, y = tasks[t][0][rank::world], tasks[t][1][rank::world]
        batches = len(x) // 32
        for _ in range(4):
            for b in range(batches):
                scale = hat.utils.get_hat_mask_scale("linear", 100.0, b / max(batches - 1, 1))
                hat.set_task(model, t, mask_scale=scale)
                loss = F.cross_entropy(ddp(x[32 * b:32 * b + 32]), y[32 * b:32 * b + 32])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        if t == 0:
            first = hat.training.predict(model, x_eval, 0, forward="set_task")
    same = torch.equal(hat.training.predict(model, x_eval, 0, forward="set_task"), first)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], g) for g in gathered)
    with open(os.path.join(out, f"rank{rank}"), "w") as f:
        f.write(f"{same} {identical}")
    dist.destroy_process_group()


def ddp_check(gpu: bool) -> bool:
    backend = "nccl" if gpu and torch.cuda.device_count() >= 2 else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_ddp_worker, args=(2, port, backend, out), nprocs=2)
        results = [pathlib.Path(out, f"rank{r}").read_text().split() for r in range(2)]
    ok = all(r == ["True", "True"] for r in results)
    where = "2 GPUs" if backend == "nccl" else "CPU"
    print(f"DDP, 2 processes, {backend} ({where}): task 0 logits bit-identical on every rank "
          f"{[r[0] for r in results]}, parameters identical across ranks {[r[1] for r in results]}")
    return ok


def main() -> int:
    if "--ddp-only" in sys.argv:  # the DDP check alone (gloo on the CPU without 2 GPUs)
        return 0 if ddp_check(gpu=torch.cuda.is_available()) else 2
    if "--cpu" in sys.argv:  # a dry run of the checks (tiny timings, no GPU figures) where no GPU is
        torch.set_num_threads(1)
        cpu = torch.device("cpu")
        ok = invariant(cpu, compile_it=False) and invariant(cpu, compile_it=True)
        print(f"dry run, eager step ratio at batch 8: {step_ratio(cpu, True, None, repeats=3, batch=8):.2f}x")
        print(f"dry run, compiled step ratio at batch 8: {step_ratio(cpu, True, 'default', repeats=3, batch=8):.2f}x")
        ok = ddp_check(gpu=False) and ok
        return 0 if ok else 2
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {datetime.date.today()}")
    ok = invariant(device, compile_it=False)
    ok = invariant(device, compile_it=True) and ok
    for fused in (False, True):
        ratio = step_ratio(device, fused)
        print(f"hat_resnet18s train step, eager, AdamW{' (fused)' if fused else ''}, batch 128, 32x32: "
              f"HAT / plain = {ratio:.3f}x")
    for mode in ("default", "reduce-overhead"):
        try:
            ratio = step_ratio(device, True, mode)
            print(f"hat_resnet18s train step, torch.compile(mode={mode!r}), AdamW (fused), batch 128: "
                  f"HAT / plain = {ratio:.3f}x")
        except Exception as err:  # noqa: BLE001 - report why a mode does not work, run the rest
            print(f"hat_resnet18s train step, torch.compile(mode={mode!r}): failed ({type(err).__name__}: "
                  f"{str(err)[:300]})")
    peak_memory(device)
    ok = ddp_check(gpu=True) and ok
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
