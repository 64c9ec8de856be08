"""On a CUDA machine: the central promise on the GPU, eager and compiled, and the step overhead.

    python benchmarks/gpu_check.py            # needs a CUDA GPU, timm and scikit-learn

1. hat_resnet18s on the GPU, AdamW with weight decay, one optimizer: task 0's eval logits are
   bit-identical after task 1 trains; the same under torch.compile (inductor), where switching
   task and scale must not recompile.
2. Train-step time of hat_resnet18s against its plain twin (hat.unconvert: the same weights in
   torch.nn layers), batch 128 at 32x32, CUDA-synchronized, median of paired ratios, for
   AdamW's default (foreach) and fused implementations.
"""

from __future__ import annotations

import statistics
import sys
import time

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


def step_ratio(device: torch.device, fused: bool, repeats: int = 40) -> float:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5), num_classes=10).to(device)
    plain = hat.unconvert(model, None)
    kw = dict(lr=1e-3, weight_decay=0.01, fused=True) if fused else dict(lr=1e-3, weight_decay=0.01)
    opt_hat, opt_plain = torch.optim.AdamW(model.parameters(), **kw), torch.optim.AdamW(plain.parameters(), **kw)
    x = torch.randn(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    def step_hat(task: int = 1) -> None:
        hat.set_task(model, task, mask_scale=50.0)
        loss = F.cross_entropy(model(x), y)
        opt_hat.zero_grad()
        loss.backward()
        opt_hat.step()

    def step_plain() -> None:
        loss = F.cross_entropy(plain(x), y)
        opt_plain.zero_grad()
        loss.backward()
        opt_plain.step()

    for _ in range(5):
        step_hat(0)
    for _ in range(5):
        step_hat()
        step_plain()
    ratios = []
    for i in range(repeats):
        order = (step_hat, step_plain) if i % 2 == 0 else (step_plain, step_hat)
        times = {}
        for fn in order:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[fn] = time.perf_counter() - t0
        ratios.append(times[step_hat] / times[step_plain])
    return statistics.median(ratios)


def main() -> int:
    if "--cpu" in sys.argv:  # a dry run of the checks (no timings) where no GPU is
        torch.set_num_threads(1)
        ok = invariant(torch.device("cpu"), compile_it=False) and invariant(torch.device("cpu"), compile_it=True)
        return 0 if ok else 2
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name())
    ok = invariant(device, compile_it=False)
    ok = invariant(device, compile_it=True) and ok
    for fused in (False, True):
        ratio = step_ratio(device, fused)
        print(f"hat_resnet18s train step, AdamW{' (fused)' if fused else ''}, batch 128, 32x32: "
              f"HAT / plain = {ratio:.3f}x")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
