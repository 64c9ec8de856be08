"""Training-step and inference overhead of a HAT CNN against the identical plain torch.nn CNN.

    python benchmarks/overhead.py            # prints the median of paired ratios

Also hat_resnet18s (hat.timm_models) against the same timm ResNet-18 with plain layers.

1 thread, batch 32, 3x32x32 inputs, AdamW twice: torch's default (a loop over the parameters
on CPU) and ``fused=True``. HAT and plain steps are interleaved in one process and each pair
gives one ratio, so slow drifts of the machine cancel. The HAT model trains task 1 with task 0
already trained, so the protection (gradient conditioning and the exact update restore) is
doing its full work.

Allocator: glibc hands freed memory back to the kernel at the end of every step (heap trimming),
and the next step page-faults it in again: on this VM that is 2000-4500 faults and 3-15 ms of
system time per CNN step, landing on whichever model runs after a trim. By default the
benchmark keeps freed memory in the process (``mallopt``: no trimming, a fixed mmap threshold),
as PyTorch's CPU tuning guide does with a caching allocator, so that the ratio measures the
computation; ``--default-malloc`` measures with glibc's defaults.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from hat import HATConfig, HATPayload
from hat.modules import HATConv2d, HATLinear, TaskIndexedBatchNorm2d, TaskIndexedLinear

CHANNELS = (32, 64, 128)


class PlainCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in CHANNELS:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(CHANNELS[-1] * 16, 256)
        self.head = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.features(x))))


class HATCNN(nn.Module):
    def __init__(self, cfg: HATConfig, classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c_in = 3
        for c in CHANNELS:
            self.convs.append(HATConv2d(c_in, c, 3, cfg, padding=1))
            self.norms.append(TaskIndexedBatchNorm2d(cfg.num_tasks, c))
            c_in = c
        self.relu, self.pool, self.flatten = nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()
        self.fc = HATLinear(CHANNELS[-1] * 16, 256, cfg)
        self.head = TaskIndexedLinear(cfg.num_tasks, 256, classes)

    def forward(self, p: HATPayload) -> HATPayload:
        for conv, norm in zip(self.convs, self.norms):
            p = norm(conv(p)).forward_by(self.relu).forward_by(self.pool)
        p = self.fc(p.forward_by(self.flatten)).forward_by(self.relu)
        return self.head(p)


@torch.no_grad()
def copy_weights(plain: PlainCNN, hat_model: HATCNN) -> None:
    convs = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in plain.features if isinstance(m, nn.BatchNorm2d)]
    for src, dst in zip(convs, hat_model.convs):
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)
    for src, dst in zip(norms, hat_model.norms):
        dst.weight.copy_(src.weight.expand_as(dst.weight))
        dst.bias.copy_(src.bias.expand_as(dst.bias))
    hat_model.fc.weight.copy_(plain.fc.weight)
    hat_model.fc.bias.copy_(plain.fc.bias)
    hat_model.head.weight.copy_(plain.head.weight.expand_as(hat_model.head.weight))
    hat_model.head.bias.copy_(plain.head.bias.expand_as(hat_model.head.bias))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed pairs per measurement")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--skip-timm", action="store_true", help="only the hand-built CNN (no timm needed)")
    parser.add_argument("--timm-repeats", type=int, default=60, help="timed pairs for hat_resnet18s (slow steps)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's heap trimming on (page faults then show in both models' steps)")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="treat subnormal floats as 0 (torch.set_flush_denormal) in both models")
    args = parser.parse_args()
    allocator = "glibc defaults" if args.default_malloc else steady_allocator()
    torch.set_num_threads(1)
    torch.set_flush_denormal(args.flush_denormal)
    n = args.repeats
    print(f"1 thread, allocator: {allocator}; medians of paired ratios HAT / plain")
    for fused in (False, True):
        train, infer, control, faults = cnn(fused, n, args.warmup)
        which = "AdamW(fused=True)" if fused else "AdamW (torch's default)"
        print(f"CNN train step, {which}, task 1 with task 0 protected: {train:.3f}x  ({n} pairs)")
        if not fused:
            print(f"CNN inference (hard mask, eval):                       {infer:.3f}x  ({n} pairs)")
            print(f"control, train step, plain copy / plain:               {control:.3f}x  ({n} pairs)")
            print(f"page faults per train step (HAT, plain):               {faults[0]:.0f}, {faults[1]:.0f}")
    if not args.skip_timm:
        for fused in (False, True):
            resnet = timm_resnet(args.timm_repeats, 3, fused)
            which = "AdamW(fused=True)" if fused else "AdamW (torch's default)"
            print(f"hat_resnet18s train step (set_task), {which}: {resnet:.3f}x  ({args.timm_repeats} pairs)")


def steady_allocator() -> str:
    """Keep memory that tensors free inside the process (glibc only), so that no step pays page
    faults for memory an earlier step gave back."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        ok = libc.mallopt(m_trim_threshold, 2**30) == 1 and libc.mallopt(m_mmap_threshold, 2**25) == 1
    except (OSError, AttributeError):
        ok = False
    return "glibc, no heap trimming" if ok else "the platform's default (mallopt not available)"


def cnn(fused: bool, repeats: int, warmup: int) -> tuple[float, float, float, tuple[float, float]]:
    """(train, inference, control) ratios for the hand-built CNN, from one set of starting weights,
    and the page faults per train step of each model."""
    torch.manual_seed(0)
    plain = PlainCNN()
    hat_model = HATCNN(HATConfig(num_tasks=5))
    copy_weights(plain, hat_model)  # weight values can change CPU speed (subnormals): start equal
    opt_plain = adamw(plain.parameters(), fused)
    opt_hat = adamw(hat_model.parameters(), fused)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))

    def step_plain() -> None:
        loss = F.cross_entropy(plain(x), y)
        opt_plain.zero_grad()
        loss.backward()
        opt_plain.step()

    def step_hat(task: int = 1) -> None:
        loss = F.cross_entropy(hat_model(HATPayload(x, task_id=task, mask_scale=50.0)).data, y)
        opt_hat.zero_grad()
        loss.backward()
        opt_hat.step()

    @torch.no_grad()
    def infer_plain() -> None:
        plain(x)

    @torch.no_grad()
    def infer_hat() -> None:
        hat_model(HATPayload(x, task_id=0))

    for _ in range(warmup):
        step_hat(0)  # task 0 becomes trained: training task 1 below protects it
        step_plain()  # the same number of steps, so both models hold trained weights
    plain.eval()
    hat_model.eval()
    infer = paired(infer_hat, infer_plain, repeats, warmup)
    plain.train()
    hat_model.train()
    train = paired(step_hat, step_plain, repeats, warmup)

    # control: the same plain network against a copy of itself; any ratio away from 1 here is
    # the measurement's own bias and noise, not HAT's
    twin = copy.deepcopy(plain)
    opt_twin = adamw(twin.parameters(), fused)
    opt_twin.load_state_dict(opt_plain.state_dict())

    def step_twin() -> None:
        loss = F.cross_entropy(twin(x), y)
        opt_twin.zero_grad()
        loss.backward()
        opt_twin.step()

    control = paired(step_twin, step_plain, repeats, warmup)
    return train, infer, control, (faults_per_call(step_hat), faults_per_call(step_plain))


def faults_per_call(fn, calls: int = 20) -> float:
    """Minor page faults per call of ``fn`` (memory the process had to map in again)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def adamw(params, fused: bool) -> torch.optim.AdamW:
    # torch's default on CPU loops over the parameters and takes torch.sqrt of Adam's second
    # moments, which is slow on exact zeros on this CPU (benchmarks/sqrt_zeros.py); the fused
    # kernel is not
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=fused or None)


def timm_resnet(repeats: int, warmup: int, fused: bool) -> float:
    """hat_resnet18s against the same timm ResNet-18 with plain layers, both from one set of
    starting weights; the HAT model selects its task with hat.set_task every step."""
    import timm

    import hat
    import hat.timm_models

    torch.manual_seed(0)
    model = timm.create_model("hat_resnet18s", hat_config=HATConfig(num_tasks=5), num_classes=10)
    plain = hat.unconvert(model, None)  # the plain twin: same weights, torch.nn layers only
    opt_hat = adamw(model.parameters(), fused)
    opt_plain = adamw(plain.parameters(), fused)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))

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
        step_hat(0)  # task 0 trained: task 1's steps protect it
    return paired(step_hat, step_plain, repeats, warmup)


def paired(fn_hat, fn_plain, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn_hat()
        fn_plain()
    ratios = []
    for i in range(repeats):
        # alternate which runs first so neither always gets the warmer cache
        order = (fn_hat, fn_plain) if i % 2 == 0 else (fn_plain, fn_hat)
        times = {}
        for fn in order:
            t0 = time.perf_counter()
            fn()
            times[fn] = time.perf_counter() - t0
        ratios.append(times[fn_hat] / times[fn_plain])
    return statistics.median(ratios)


if __name__ == "__main__":
    main()
