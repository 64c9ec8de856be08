"""One task as a small plain model (hat.prune), then forgetting a task and reusing its slot.

    python examples/pruning.py                     # split Fashion-MNIST, writes pruning_out/task2.pt2
    python examples/pruning.py --dataset digits --epochs 20   # scikit-learn digits, 8x8, a few seconds

A small CNN with BatchNorm, converted with hat.convert, learns five 2-class tasks. Task 2 is
exported without the units it never uses: fewer parameters and FLOPs, faster on a CPU, the same
outputs as the HAT model; torch.export saves it and torch alone loads it back. Then task 1 is
forgotten (its units go back to the free pool) and a new task trains in its slot, while tasks
0, 2, 3 and 4 give bit-identical outputs throughout.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import hat
from hat.training import predict

from _common import load_tasks
from _loop import accuracy, train_task

parser = argparse.ArgumentParser()
parser.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--per-task", type=int, default=2000, help="training images per task")
parser.add_argument("--repeats", type=int, default=15, help="timed runs of each model (the median is printed)")
parser.add_argument("--out", default="pruning_out", help="folder for the exported model")
args = parser.parse_args()

torch.manual_seed(0)
tasks = load_tasks(args.dataset, args.per_task)
side = tasks[0][0].shape[-1]
plain = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64 * (side // 4) ** 2, 256), nn.ReLU(), nn.Linear(256, 2))
# 5 task slots: the new task at the end reuses the slot of the forgotten one
model = hat.convert(plain, hat.HATConfig(num_tasks=5))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # one optimizer for every task, the new one too

for t, (x, y, x_te, y_te) in enumerate(tasks):
    train_task(model, optimizer, x, y, t, epochs=args.epochs, s_max=100.0, batch_size=64)
    print(f"task {t}: test accuracy {100 * accuracy(model, x_te, y_te, t):.1f} %", flush=True)

# -- task 2 as a plain, pruned model ----------------------------------------------------------------
x2 = tasks[2][2][:256]
pruned = hat.prune(model, 2, x2)  # checks itself: raises if its outputs differ from the HAT model's
full = hat.unconvert(model, 2)  # the same task at full width, for comparison
report = hat.prune_report(model, 2, x2)[0]
print(f"\ntask 2 pruned: {report.params_pruned:,} parameters (full {report.params:,}), "
      f"{report.flops_pruned / 1e6:.1f} MFLOPs (full {report.flops / 1e6:.1f}) for {len(x2)} images")
for name, (kept, units) in report.kept.items():
    print(f"  layer {name}: {kept:3d} of {units:3d} units kept")

torch.set_num_threads(1)
times: dict[str, list[float]] = {"full": [], "pruned": []}
with torch.inference_mode():
    for _ in range(args.repeats):  # alternated, so that both see the same machine state
        for name, net in (("full", full.eval()), ("pruned", pruned.eval())):
            start = time.perf_counter()
            net(x2)
            times[name].append(time.perf_counter() - start)
full_ms, pruned_ms = (1e3 * statistics.median(times[k]) for k in ("full", "pruned"))
print(f"CPU time, 1 thread, {len(x2)} images (median of {args.repeats}): pruned {pruned_ms:.2f} ms, "
      f"full {full_ms:.2f} ms ({full_ms / pruned_ms:.2f}x faster)")

reference = predict(model, x2, 2, forward="set_task")
with torch.no_grad():
    out = pruned(x2)
same = torch.equal(out.argmax(1), reference.argmax(1))
print(f"pruned vs HAT model, task 2: max abs difference {(out - reference).abs().max().item():.2e}, "
      f"predictions {'identical' if same else 'DIFFERENT'}")

folder = Path(args.out)
folder.mkdir(parents=True, exist_ok=True)
path = folder / "task2.pt2"
program = torch.export.export(pruned, (x2,), dynamic_shapes=({0: torch.export.Dim("batch")},))
torch.export.save(program, path)
loaded = torch.export.load(path).module()  # a torch.fx GraphModule: no hat class inside
with torch.no_grad():
    again = loaded(x2[:10])
libraries = sorted({type(m).__module__.split(".")[0] for m in loaded.modules()})
print(f"saved {path}; loaded back: modules from {libraries}, "
      f"outputs equal: {torch.allclose(again, out[:10], atol=1e-6)}")


# -- forgetting task 1 and training a new task in its slot -----------------------------------------
def capacity_line() -> str:
    return ", ".join(f"layer {layer.name} {layer.used}/{layer.units}" for layer in hat.capacity(model))


def outputs() -> dict[int, torch.Tensor]:
    return {t: predict(model, tasks[t][2][:500], t, forward="set_task") for t in (0, 2, 3, 4)}


def bit_identical(before: dict[int, torch.Tensor]) -> str:
    after = outputs()
    same = all(torch.equal(before[t], after[t]) for t in before)
    return f"tasks 0, 2, 3, 4 {'bit-identical' if same else 'CHANGED'}"


kept = outputs()
print(f"\nunits used before forgetting task 1: {capacity_line()}")
hat.forget_task(model, 1)
print(f"units used after forgetting task 1:  {capacity_line()}")
print(f"after forgetting: {bit_identical(kept)}")

# the new task: tell task 0's images (label 0) from task 4's (label 1), trained as task id 1
x_new = torch.cat([tasks[0][0], tasks[4][0]])
y_new = torch.cat([torch.zeros(len(tasks[0][0])), torch.ones(len(tasks[4][0]))]).long()
x_new_te = torch.cat([tasks[0][2], tasks[4][2]])
y_new_te = torch.cat([torch.zeros(len(tasks[0][2])), torch.ones(len(tasks[4][2]))]).long()
train_task(model, optimizer, x_new, y_new, 1, epochs=args.epochs, s_max=100.0, batch_size=64)
print(f"new task (id 1): test accuracy {100 * accuracy(model, x_new_te, y_new_te, 1):.1f} %")
print(f"units used after the new task:       {capacity_line()}")
print(f"after the new task: {bit_identical(kept)}")
