"""Class-incremental learning with hat.predict: no task id at test time, no sample stored (issue 16).

    python benchmarks/class_incremental.py                 # seeds 0 1 2; needs Debian's dataset-fashion-mnist
    python benchmarks/class_incremental.py --benchmark split-digits --seeds 0 1 2 3 4
    python benchmarks/class_incremental.py --cost          # the inference-cost part alone (trains one model)

split-fashion-mnist: 5 tasks of 2 classes in class order (0-1, 2-3, ...), the CLI's HAT MLP
784-400-400 (``experiment.build_model("mlp", 5, 2, input_shape=(1, 28, 28), hidden=400)``, one
head per task), one Adam optimizer (lr 1e-3) for the whole sequence, batch 128, 2 epochs per
task, mask scale annealed to 400. split-digits: scikit-learn's 8x8 digits split the same way
(``experiment.split_digits(5, seed)``), the MLP 64-256-256, Adam lr 1e-3, batch 32, 10 epochs.
After each task is trained, ``hat.fit_task_scores`` records its statistics (per-class means, a
covariance of its masked features shared by its classes and one of the pixels per class): no
training sample is kept.

Printed per seed and as mean ± std over seeds (sample std): the class-incremental accuracy after
the last task over the whole test set (``hat.predict``'s global class against ``2 t + label``, no
task id given), the task-prediction accuracy, the task-incremental accuracy (``training.evaluate``
with the true task id), the BWT of the task-incremental accuracy matrix (every earlier task
evaluated after each task: exactly 0 under HAT), the class-incremental accuracy matrix (row: after
task t, ``hat.predict`` choosing among tasks 0..t; column: task k's test set) and the README's
table row.

Inference cost (``--cost``; by default after the accuracies): on the first benchmark's first-seed
model, one thread, eval mode, no grad, 1000 test samples (all 539 on split digits); every variant
runs once per repeat, in an order rotated each repeat, and the medians are compared: ``hat.predict`` (one forward of the
batch repeated once per task, per-sample task ids, then the scoring) against a loop of 5
``hat.predict(model, x, tasks=[t])`` (one forward and the scoring per task), 5 bare forwards
``model(HATPayload(x, task_id=t))``, the batched forward alone, one HAT forward with one task id,
and one forward of the plain twin (task 0's layers from ``hat.unconvert`` in an ``nn.Sequential``,
since the unconverted MLP's own forward still expects payloads). On a shared machine the times
are noisy; the ratios, measured side by side, less so.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

import hat
from hat import HATPayload, training
from hat.app import experiment

TASKS = 5
CLASSES = 2
S_MAX = 400.0


class Setting(NamedTuple):
    load: Callable[[int, Any], list]  # (seed, data_dir) -> tasks
    build: Callable[[], nn.Module]
    batch_size: int
    epochs: int
    seeded_data: bool  # whether the data split depends on the seed (else loaded once)


SETTINGS = {
    "split-fashion-mnist": Setting(
        load=lambda seed, data_dir: experiment.split_fashion_mnist(TASKS, data_dir),
        build=lambda: experiment.build_model("mlp", TASKS, CLASSES, input_shape=(1, 28, 28), hidden=400),
        batch_size=128, epochs=2, seeded_data=False),
    "split-digits": Setting(
        load=lambda seed, data_dir: experiment.split_digits(TASKS, seed),
        build=lambda: experiment.build_model("mlp", TASKS, CLASSES),
        batch_size=32, epochs=10, seeded_data=True),
}


class Result(NamedTuple):
    cil: float  # fractions in [0, 1]
    task_prediction: float
    til: float
    bwt: float
    cil_matrix: list[list[float]]
    til_matrix: list[list[float]]
    model: nn.Module
    tasks: list
    seconds: tuple[float, float, float]  # training, fitting the scores, predicting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None, help="a folder with Fashion-MNIST's IDX files")
    parser.add_argument("--cost", action="store_true", help="only the inference-cost part (one model, first seed)")
    parser.add_argument("--no-cost", action="store_true", help="skip the inference-cost part")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each variant (medians printed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    first = None
    for name in args.benchmark:
        setting = SETTINGS[name]
        results, tasks = [], None
        for seed in args.seeds[:1] if args.cost else args.seeds:
            if tasks is None or setting.seeded_data:
                tasks = setting.load(seed, args.data_dir)
            result = run(setting, tasks, seed)
            results.append(result)
            first = first or (name, seed, result)
            if not args.cost:
                report_seed(name, seed, result)
        if args.cost:
            break
        summarize(name, args.seeds, results)
    if not args.no_cost:
        name, seed, result = first
        cost(name, seed, result.model, result.tasks, args.repeats)


# -- training and the accuracies ----------------------------------------------------------------------
def run(setting: Setting, tasks: list, seed: int) -> Result:
    """Train the sequence with ``seed``; after each task record its scores and evaluate."""
    torch.manual_seed(seed)
    model = setting.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # one optimizer for the whole sequence
    til_matrix: list[list[float]] = []
    cil_matrix: list[list[float]] = []
    seconds = [0.0, 0.0, 0.0]
    for t, (x, y, _, _) in enumerate(tasks):
        start = time.perf_counter()
        training.train_task(model, optimizer, (x, y), t, epochs=setting.epochs, batch_size=setting.batch_size,
                            generator=torch.Generator().manual_seed(seed), max_scale=S_MAX)
        seconds[0] += time.perf_counter() - start
        start = time.perf_counter()
        hat.fit_task_scores(model, t, (x, y))  # statistics of the task's data; no sample kept
        seconds[1] += time.perf_counter() - start
        til_matrix.append([training.evaluate(model, (x_te, y_te), k) for k, (_, _, x_te, y_te) in
                           enumerate(tasks[:t + 1])])
        start = time.perf_counter()
        seen = tasks[:t + 1]
        pred = hat.predict(model, torch.cat([task[2] for task in seen]))  # among the trained tasks 0..t
        seconds[2] += time.perf_counter() - start
        true_task = torch.cat([torch.full_like(task[3], k) for k, task in enumerate(seen)])
        true_class = torch.cat([task[3] + CLASSES * k for k, task in enumerate(seen)])
        right = pred.global_class == true_class
        cil_matrix.append([right[true_task == k].float().mean().item() for k in range(t + 1)])
    return Result(cil=right.float().mean().item(), task_prediction=(pred.task_id == true_task).float().mean().item(),
                  til=experiment.average_accuracy(til_matrix), bwt=experiment.backward_transfer(til_matrix),
                  cil_matrix=cil_matrix, til_matrix=til_matrix, model=model, tasks=tasks, seconds=tuple(seconds))


def report_seed(name: str, seed: int, r: Result) -> None:
    train_s, fit_s, predict_s = r.seconds
    print(f"\n{name}, seed {seed}: CIL accuracy {100 * r.cil:.2f} %, task prediction {100 * r.task_prediction:.2f} %, "
          f"TIL accuracy {100 * r.til:.2f} %, BWT (TIL) {100 * r.bwt + 0.0:+.2f} pp (exactly 0: {r.bwt == 0.0}); "
          f"train {train_s:.1f} s, fit_task_scores {fit_s:.1f} s, hat.predict {predict_s:.1f} s (all tasks, "
          f"after each)", flush=True)
    print("  CIL accuracy matrix, % (row: after task t, predicting among tasks 0..t; column: task k's test set)")
    for t, row in enumerate(r.cil_matrix):
        print(f"    after task {t}: " + "  ".join(f"{100 * a:5.1f}" for a in row))


def summarize(name: str, seeds: list[int], results: list[Result]) -> None:
    def mean_std(values: list[float], scale: float = 100.0) -> str:
        values = [scale * v for v in values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {std:.2f}"

    print(f"\n{name}, seeds {seeds}: mean ± std (sample std over seeds)")
    print(f"  CIL accuracy (no task id)     {mean_std([r.cil for r in results])} %")
    print(f"  task-prediction accuracy      {mean_std([r.task_prediction for r in results])} %")
    print(f"  TIL accuracy (task id given)  {mean_std([r.til for r in results])} %")
    print(f"  BWT of the TIL matrix         {mean_std([r.bwt for r in results])} pp "
          f"(exactly 0 for every seed: {all(r.bwt == 0.0 for r in results)})")
    per_task = [mean_std([r.cil_matrix[-1][k] for r in results]) for k in range(TASKS)]
    print("  final CIL accuracy per task   " + ", ".join(f"task {k} {a}" for k, a in enumerate(per_task)))
    print(f"\n| method | samples stored | CIL accuracy ({name}, 5 tasks, {len(seeds)} seeds) |")
    print("|---|---|---|")
    cil = [100 * r.cil for r in results]
    std = statistics.stdev(cil) if len(cil) > 1 else 0.0
    print(f"| HAT + task prediction (hat.predict) | 0 | {statistics.mean(cil):.1f} ± {std:.1f} |", flush=True)
    state = results[0].model.state_dict()
    kept = {k: v for k, v in state.items() if k.startswith("hat_task_scores_")}
    images = sum(task[0].numel() for task in results[0].tasks)
    print(f"  statistics kept for task prediction: {sum(v.numel() for v in kept.values()):,} numbers, "
          f"{sum(v.numel() * v.element_size() for v in kept.values()) / 1e6:.1f} MB in the state dict (the "
          f"model's parameters: {sum(p.numel() for p in results[0].model.parameters()):,}; the training images "
          f"held {images:,} values)", flush=True)


# -- inference cost -----------------------------------------------------------------------------------
def plain_twin(model: nn.Module, task_id: int) -> nn.Module:
    """Task ``task_id`` as a plain ``nn.Sequential``: the layers of ``hat.unconvert`` (masks folded in)."""
    p = hat.unconvert(model, task_id)
    return nn.Sequential(p.flatten, p.fc1, nn.ReLU(), p.fc2, nn.ReLU(), p.head).eval()


def cost(name: str, seed: int, model: nn.Module, tasks: list, repeats: int, batch: int = 1000) -> None:
    x = torch.cat([task[2] for task in tasks])
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:batch]]
    batch = len(x)  # split digits has fewer test samples
    ids = torch.arange(TASKS).repeat_interleave(batch)
    repeated = x.unsqueeze(0).expand(TASKS, *x.shape).reshape(TASKS * batch, *x.shape[1:])
    twin = plain_twin(model, 0)
    model.eval()

    def loop() -> hat.Prediction:
        """One ``hat.predict`` per task, then the best task and its head's class."""
        preds = [hat.predict(model, x, tasks=[t]) for t in range(TASKS)]
        scores = torch.stack([p.scores[:, t] for t, p in enumerate(preds)], 1)
        task_id = scores.argmax(1)
        logits = torch.stack([p.logits for p in preds])[task_id, torch.arange(batch)]
        return hat.Prediction(task_id, logits.argmax(1), CLASSES * task_id + logits.argmax(1), scores, logits)

    variants: dict[str, Callable[[], Any]] = {
        f"hat.predict (one forward of 5 x {batch} rows + scoring)": lambda: hat.predict(model, x),
        "5 x hat.predict(tasks=[t]) (a forward + scoring each)": loop,
        "5 separate forwards model(HATPayload(x, task_id=t))": lambda: [model(HATPayload(x, task_id=t))
                                                                       for t in range(TASKS)],
        f"the batched forward alone ({TASKS * batch} rows, per-sample ids)": lambda: model(HATPayload(repeated,
                                                                                                     task_id=ids)),
        "one HAT forward, one task id": lambda: model(HATPayload(x, task_id=0)),
        "one plain forward (task 0's nn.Sequential twin)": lambda: twin(x),
    }
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(repeats + 2):  # the first two warm up
            order = names[i % len(names):] + names[:i % len(names)]
            for n in order:
                start = time.perf_counter()
                variants[n]()
                if i >= 2:
                    times[n].append(time.perf_counter() - start)
        batched, looped = hat.predict(model, x), loop()
        twin_diff = (twin(x) - training.predict(model, x, 0)).abs().max().item()
    ms = {n: 1e3 * statistics.median(times[n]) for n in names}
    print(f"\ninference cost, {name} model (seed {seed}), {batch} test samples, 1 thread, eval, no grad, "
          f"median of {repeats} (noisy on a shared machine):")
    for n in names:
        print(f"  {n:55s} {ms[n]:8.2f} ms")
    predict_ms, plain_ms = ms[names[0]], ms[names[-1]]
    print(f"  hat.predict / loop of 5 hat.predict:       {predict_ms / ms[names[1]]:.2f}")
    print(f"  hat.predict / 5 separate forwards:         {predict_ms / ms[names[2]]:.2f}")
    print(f"  batched forward / 5 separate forwards:     {ms[names[3]] / ms[names[2]]:.2f}")
    print(f"  scoring share of hat.predict:              {1 - ms[names[3]] / predict_ms:.2f} "
          "(1 - batched forward / hat.predict)")
    print(f"  hat.predict / one plain forward:           {predict_ms / plain_ms:.1f}")
    print(f"  one HAT forward / one plain forward:       {ms[names[4]] / plain_ms:.2f}")
    print(f"  loop and batched agree: tasks {torch.equal(batched.task_id, looped.task_id)}, global classes "
          f"{torch.equal(batched.global_class, looped.global_class)}, max |score diff| "
          f"{(batched.scores - looped.scores).abs().max().item():.1e}; plain twin vs HAT task 0: max |diff| "
          f"{twin_diff:.1e}")


if __name__ == "__main__":
    main()
