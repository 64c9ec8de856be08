"""hat.prune on split Fashion-MNIST: per task, parameters and FLOPs of the pruned plain model
against the unpruned one (hat.unconvert), and its measured CPU inference time against the FLOP
ratio (the README's pruning table).

    python benchmarks/prune.py          # needs Debian's dataset-fashion-mnist (or --data-dir)

Two networks learn the 5 tasks of split Fashion-MNIST (2 classes each, one head per task; Adam
lr 1e-3, batch 64, 1 epoch per task): a CNN (conv 32-64-128 with BatchNorm and max-pooling,
flatten, linear 256) converted with ``hat.convert``, and ``hat_resnet18s`` (1-channel input,
2000 training images per task to keep the run short). Each task is then pruned. Timing: one
thread, evaluation mode, no grad, batch 64 of the task's test images; the pruned and the full
plain model run alternately and each pair gives one time ratio; the median of ``--repeats``
pairs is printed beside the FLOP ratio (FlopCounterMode), in torch's default memory format
(NCHW) and in channels_last (NHWC, which oneDNN runs without reordering odd channel counts), and
once more with every cut width rounded up to a multiple of 16 (``multiple_of=16``: the widths the
CPU kernels compute anyway). Accuracies of the pruned models are measured on each task's test
set and must equal the HAT model's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import training
from hat.app.experiment import split_fashion_mnist


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in (32, 64, 128):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.fc = nn.Linear(128 * 3 * 3, 256)
        self.head = nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(self.features(x))))


def build(name: str, num_tasks: int) -> nn.Module:
    cfg = hat.HATConfig(num_tasks=num_tasks)
    if name == "cnn":
        return hat.convert(CNN(), cfg)
    import importlib

    import timm

    importlib.import_module("hat.timm_models")  # registers hat_resnet18s in timm
    return timm.create_model("hat_resnet18s", hat_config=cfg, num_classes=2, in_chans=1)


def paired_ratio(small: nn.Module, full: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median over ``repeats`` alternating runs of time(small) / time(full)."""
    ratios = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            times = []
            for m in (small, full) if i % 2 == 0 else (full, small):
                start = time.perf_counter()
                m(x)
                times.append((m, time.perf_counter() - start))
            t = {id(m): s for m, s in times}
            if i >= warmup:
                ratios.append(t[id(small)] / t[id(full)])
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn", "hat_resnet18s"], choices=["cnn", "hat_resnet18s"])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = split_fashion_mnist(5, args.data_dir)
    for name in args.models:
        torch.manual_seed(args.seed)
        model = build(name, len(tasks))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        limit = None if name == "cnn" else 2000
        start = time.perf_counter()
        for t, (x, y, _, _) in enumerate(tasks):
            training.train_task(model, opt, (x[:limit], y[:limit]), t, epochs=1, batch_size=64, forward="set_task",
                                generator=torch.Generator().manual_seed(args.seed + t))
        print(f"\n{name}: trained 5 tasks in {time.perf_counter() - start:.0f} s")
        print("task | params full -> pruned     | FLOP ratio | time ratio (NCHW, NHWC) | multiple_of=16: FLOP ratio, "
              "time ratio NHWC | accuracy HAT = pruned | max |diff|")
        for t, (_, _, x_te, y_te) in enumerate(tasks):
            x = x_te[:64]
            full = hat.unconvert(model, t).eval()
            cells = []
            for multiple in (1, 16):
                report = hat.prune_report(model, t, x[:1], multiple_of=multiple)[0]
                small = hat.prune(model, t, x[:1], multiple_of=multiple).eval()
                flop_ratio = report.flops_pruned / report.flops
                x_nhwc = x.to(memory_format=torch.channels_last)
                nhwc = paired_ratio(_channels_last(small), _channels_last(full), x_nhwc, args.repeats)
                full = full.to(memory_format=torch.contiguous_format)
                if multiple == 1:
                    nchw = paired_ratio(small, full, x, args.repeats)
                    cells.append(f"{flop_ratio:10.3f} | {nchw:.3f} ({nchw / flop_ratio:.2f}x), {nhwc:.3f} "
                                 f"({nhwc / flop_ratio:.2f}x)")
                    exact, params = small, (report.params, report.params_pruned)
                else:
                    cells.append(f"{flop_ratio:.3f}, {nhwc:.3f} ({nhwc / flop_ratio:.2f}x)")
            logits = training.predict(model, x_te, t, forward="set_task")
            with torch.no_grad():
                pruned_logits = exact.to(memory_format=torch.contiguous_format)(x_te)
            acc = (logits.argmax(1) == y_te).float().mean().item()
            acc_pruned = (pruned_logits.argmax(1) == y_te).float().mean().item()
            print(f"{t:4d} | {params[0]:>10,} -> {params[1]:>10,} | {cells[0]} | {cells[1]} | "
                  f"{100 * acc:6.2f} % = {100 * acc_pruned:6.2f} % | "
                  f"{float((pruned_logits - logits).abs().max()):.1e}", flush=True)


def _channels_last(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)


if __name__ == "__main__":
    main()
