"""``python -m hat run``: a continual-learning run on real data, printed as an accuracy matrix.

Reproduces ``make demo``::

    python -m hat run --benchmark split-digits --model mlp --epochs 5 --optimizer adamw --lr 1e-3 --seed 0

:func:`main` parses and prints; :func:`run` does the work and returns the numbers. Neither
changes global state: weight initialization draws from a forked, seeded global RNG, and the
rest from local ``torch.Generator`` objects.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["build_parser", "format_results", "main", "run"]

SCENARIOS = ("task-incremental", "class-incremental")
BENCHMARKS = ("split-digits", "split-fashion-mnist", "permuted-fashion-mnist", "split-cifar10", "split-cifar100")
MAX_TASKS = {"split-digits": 5, "split-fashion-mnist": 5, "permuted-fashion-mnist": 20, "split-cifar10": 5,
             "split-cifar100": 10}
# tasks when --tasks is not given: all of them, but the permuted recipe's usual 10
DEFAULT_TASKS = {**MAX_TASKS, "permuted-fashion-mnist": 10}
# the MLP's hidden width per benchmark (split-fashion-mnist: the 784-400-400 of the usual recipe)
DEFAULT_HIDDEN = {"split-digits": 256, "split-fashion-mnist": 400, "permuted-fashion-mnist": 400, "split-cifar10": 400,
                  "split-cifar100": 400}
# SGD needs a larger step than Adam's; 0.05 is the paper's SGD learning rate
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.05}


def build_parser() -> argparse.ArgumentParser:
    from hat.app.experiment import METHODS, MODELS, OPTIMIZERS

    parser = argparse.ArgumentParser(prog="python -m hat",
                                     description="HAT (Hard Attention to the Task) continual learning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = commands.add_parser(
        "run", help="train a task sequence and print the accuracy matrix, average accuracy and BWT",
        description="Train the tasks of a benchmark in order with one optimizer; after each task, evaluate "
                    "every task seen so far. Prints the accuracy matrix, the final average accuracy and the "
                    "backward transfer (BWT, negative = forgetting).",
        formatter_class=_HelpFormatter,
    )
    r.add_argument("--benchmark", choices=BENCHMARKS, default="split-digits",
                   help="split-digits: scikit-learn's 8x8 digits, task t = digit 2t vs 2t+1; split-fashion-mnist: "
                        "Fashion-MNIST 28x28, task t = class 2t vs 2t+1 (Debian: apt-get install "
                        "dataset-fashion-mnist, or --data-dir); permuted-fashion-mnist: 10 tasks, each all 10 classes "
                        "under its own pixel permutation; split-cifar10 (5 tasks of 2 classes) and "
                        "split-cifar100 (10 tasks of 10 classes): a local copy of the python batches via --data-dir")
    r.add_argument("--data-dir", default=None, help="folder with the benchmark's files (split-fashion-mnist: the four "
                                                    "IDX files); default: where Debian's package puts them")
    r.add_argument("--model", type=_model_name, default="mlp", metavar="{" + ",".join(MODELS) + ",hat_*}",
                   help="mlp: HATLinear 64-256-256; cnn: two HATConv2d+BatchNorm blocks, HATLinear 64; "
                        "both with one linear head per task; or a hat_* timm model (hat.timm_models), e.g. "
                        "hat_resnet18s")
    r.add_argument("--hidden", type=_positive_int, default=None,
                   help="hidden width (default: mlp 256 on split-digits, 400 on split-fashion-mnist; cnn 64)")
    r.add_argument("--method", choices=METHODS, default="hat",
                   help="hat: task t trains and is evaluated with task_id=t (its masks and its own head), "
                        "earlier tasks protected exactly; finetune: the same network with task_id=None "
                        "throughout: no masks, no protection, and the one shared head (labels 0/1 of every "
                        "task on the same two outputs), the baseline that forgets")
    r.add_argument("--tasks", type=_positive_int, default=None,
                   help="number of tasks (default: all: 5; split-cifar100: 10; permuted-fashion-mnist: 10 of up to 20)")
    r.add_argument("--epochs", type=_positive_int, default=5, help="epochs per task")
    r.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="one optimizer for the whole sequence; adamw: weight decay 0.01; sgd: momentum 0.9")
    r.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    r.add_argument("--batch-size", type=_positive_int, default=32, help="batch size")
    r.add_argument("--s-max", type=_positive_float, default=400.0,
                   help="largest mask scale; annealed linearly from 1/s_max within each epoch (paper: 400)")
    r.add_argument("--mask-init", choices=("normal", "dense", "sparse"), default="normal",
                   help="task embeddings at the start: normal N(0,1) (paper), dense (every unit on), "
                        "sparse (every unit off)")
    r.add_argument("--reg", type=_non_negative_float, default=0.75,
                   help="weight c of the mask regularizer (paper: 0.75)")
    r.add_argument("--budget", type=_budget, default=None, metavar="B",
                   help="each task starts with every free unit on; after it, release the units it added beyond B "
                        "times its fair share of the free units (hat.compress), then train it one more epoch at its "
                        "final masks: capacity left for later tasks (a fraction in (0, 1]; default: off)")
    r.add_argument("--scenario", choices=SCENARIOS, default="task-incremental",
                   help="task-incremental: the task id is given at test time; class-incremental: it is not: after "
                        "each task HAT records its statistics (hat.fit_task_scores) and every test sample seen so "
                        "far is classified among all classes seen so far (hat.predict); fine-tuning then has one "
                        "shared head over all classes")
    r.add_argument("--seed", type=int, default=0, help="seeds the data split, weight init and batch order")
    r.add_argument("--compare", action="store_true",
                   help="also run --method finetune on the same data and settings, and print both")
    r.add_argument("--checkpoint-every", choices=("task", "never"), default="never",
                   help="task: after every task, save model, optimizer and progress to OUT/checkpoint (needs --out)")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run checkpointed in DIR (an --out folder); the settings must be the same")
    r.add_argument("--stop-after", type=_positive_int, default=None, metavar="TASKS",
                   help="stop once this many tasks are trained (with --checkpoint-every task, --resume continues)")
    r.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                   help="train in N processes (DistributedDataParallel over gloo, one shard of every task each): "
                        "launches torchrun --standalone --nproc-per-node N for you")
    r.add_argument("--out", default=None, help="write results.json, accuracy_matrix.png and capacity.png here (the "
                                               "folder is created)")
    f = commands.add_parser(
        "forget", help="forget one task of a checkpointed run: a new run folder without it",
        description="Load the run checkpointed in --run (made with --checkpoint-every task), forget --task with "
                    "hat.forget_task (its rows reset, the units only it used released for later tasks, every other "
                    "task bit-identical) and write a new run folder, resumable with hat-cl run --resume. Prints the "
                    "capacity before and after.",
        formatter_class=_HelpFormatter,
    )
    f.add_argument("--run", required=True, metavar="DIR", help="the run folder (or its checkpoint folder)")
    f.add_argument("--task", required=True, type=int, help="the trained task to forget")
    f.add_argument("--out", default=None, metavar="DIR", help="the new run folder (default: DIR-without-task-K)")
    r.add_argument("--export", default=None, metavar="DIR",
                   help="after training, write one pruned plain model per task to DIR (task_<t>.pt2, torch.export "
                        "archives that run with torch alone: torch.export.load(path).module()(x)) and print their "
                        "parameters and FLOPs against the full model (hat.prune)")
    return parser


def run(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the experiment ``args`` describes (as :func:`build_parser` parses them).

    Returns ``matrix`` (``matrix[t][k]``: accuracy in [0, 1] on task ``k`` after training task
    ``t``), ``average_accuracy``, ``bwt``, ``forgetting`` (fractions), ``capacity`` (HAT runs:
    :func:`hat.app.experiment.capacity_report`, per layer and task; ``{}`` for fine-tuning),
    ``seconds`` and ``args`` (a dict, with the learning rate filled in). ``log``, if given, gets
    one line per trained task of a HAT run: each layer's units used, added and free.

    Class-incremental runs (``--scenario class-incremental``) add ``cil_matrix`` (row ``t``: the
    accuracy on each task's test samples after task ``t``, no task id given), ``cil_accuracy``
    (after the last task, over every test sample seen, %), ``task_prediction_accuracy`` (%, HAT)
    and ``til_accuracy`` (%, HAT: the task-incremental average accuracy beside them). For
    fine-tuning, ``matrix`` is the class-incremental one (one shared head over all classes).
    """
    from pathlib import Path

    import hat
    from hat.app import checkpoint as _checkpoint
    from hat.app.experiment import (
        average_accuracy,
        backward_transfer,
        capacity_report,
        evaluate_class_incremental,
        forgetting,
        run_sequence,
    )

    config = vars(args).copy()
    config.setdefault("scenario", "task-incremental")
    if config["lr"] is None:
        config["lr"] = DEFAULT_LR[args.optimizer]
    if config["tasks"] is None:
        config["tasks"] = DEFAULT_TASKS[args.benchmark]
    if config["hidden"] is None and args.model == "mlp":
        config["hidden"] = DEFAULT_HIDDEN[args.benchmark]
    start = time.perf_counter()
    tasks, model, optimizer, generator = _build_run(config)
    rank, world = _distributed()
    config["world_size"] = world  # a checkpoint resumes with as many processes as wrote it
    train_with = None
    if world > 1:  # torchrun: each rank trains on its shard of every task, the ranks' gradients averaged
        from torch.nn.parallel import DistributedDataParallel

        tasks = _shards(tasks, rank, world)
        # fine-tuning runs without a task: the task embeddings get no gradient
        train_with = DistributedDataParallel(model, find_unused_parameters=args.method == "finetune")
        if rank != 0:
            log = None  # rank 0 alone prints, checkpoints and writes results
    start_task, done, elapsed = 0, None, 0.0
    cil = config["scenario"] == "class-incremental"
    cil_rows: list[list[float]] = []
    cil_last: dict[str, Any] = {}
    if args.resume is not None:
        folder = _checkpoint.locate(Path(args.resume))
        meta = _checkpoint.read_meta(folder)
        _check_same_settings(meta["args"], config)
        _checkpoint.load(folder, meta, model, optimizer, generator)
        start_task, done, elapsed = meta["tasks_done"], meta["matrix"], meta["seconds"]
        cil_rows, cil_last = meta.get("cil_matrix", []), meta.get("cil_last", {})

    def after_task(t: int, matrix: list[list[float]]) -> bool:
        nonlocal cil_last
        if log is not None and args.method == "hat":
            log(_capacity_line(t, capacity_report(model)))
        if cil:
            if args.method == "hat":  # what task prediction needs, from the task's training data, once
                hat.fit_task_scores(model, t, (tasks[t][0], tasks[t][1]))
            cil_last = evaluate_class_incremental(model, tasks[:t + 1], args.method)
            cil_rows.append(cil_last["per_task"])
            if log is not None:
                log(f"task {t}: class-incremental accuracy {100 * cil_last['accuracy']:.2f} % over tasks 0-{t}" + (
                    f", task prediction {100 * cil_last['task_prediction']:.2f} %" if "task_prediction" in cil_last
                    else ""))
        if args.checkpoint_every == "task" and rank == 0:
            _checkpoint.save(Path(args.out), model, optimizer, generator,
                             {"args": config, "tasks_done": t + 1, "matrix": matrix,
                              "seconds": elapsed + time.perf_counter() - start,
                              **({"cil_matrix": cil_rows, "cil_last": cil_last} if cil else {})})
        return args.stop_after is not None and t + 1 >= args.stop_after

    matrix = run_sequence(model, optimizer, tasks, method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                          s_max=args.s_max, reg=args.reg, generator=generator,
                          progress=_progress(f"{args.method}") if rank == 0 else None,
                          start=start_task, matrix=done, after_task=after_task, budget=args.budget,
                          train_with=train_with)
    exported = None
    if args.export is not None and args.method == "hat" and rank == 0:
        from hat.app.export import export_tasks

        exported = export_tasks(model, tasks, Path(args.export))
    extra: dict[str, Any] = {}
    if cil:
        extra = {"cil_matrix": cil_rows, "cil_accuracy": 100 * cil_last["accuracy"],
                 "task_prediction_accuracy": (100 * cil_last["task_prediction"] if "task_prediction" in cil_last
                                              else None),
                 "til_accuracy": 100 * average_accuracy(matrix) if args.method == "hat" else None}
    return {
        **extra,
        "matrix": matrix,
        "average_accuracy": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
        "capacity": capacity_report(model) if args.method == "hat" else {},
        "export": exported,
        "seconds": elapsed + time.perf_counter() - start,
        "args": config,
    }


def _distributed() -> tuple[int, int]:
    """``(rank, world size)``: under torchrun (``WORLD_SIZE`` > 1) the process group is started here
    (gloo: the CLI trains on the CPU) if it is not already; else ``(0, 1)``."""

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def _shards(tasks: list, rank: int, world: int) -> list:
    """Each task's training data cut as ``DistributedSampler`` cuts it (padded so that every rank
    gets as many samples, hence as many batches: DDP steps all ranks together); test data whole."""
    from torch.utils.data import DistributedSampler

    out = []
    for x_tr, y_tr, x_te, y_te in tasks:
        idx = list(DistributedSampler(range(len(x_tr)), num_replicas=world, rank=rank, shuffle=False))
        out.append((x_tr[idx], y_tr[idx], x_te, y_te))
    return out


def _build_run(config: dict[str, Any]) -> tuple[list, Any, Any, Any]:
    """The tasks, the model (weights seeded by ``config['seed']``), the optimizer and the batch
    order generator of a run with the settings ``config`` (``run``'s arguments, defaults filled)."""
    import torch

    from hat.app.experiment import (
        build_model,
        build_optimizer,
        class_incremental,
        permuted_fashion_mnist,
        split_cifar,
        split_digits,
        split_fashion_mnist,
    )

    benchmark, n, data_dir, seed = config["benchmark"], config["tasks"], config["data_dir"], config["seed"]
    if benchmark == "split-fashion-mnist":
        tasks = split_fashion_mnist(n, data_dir=data_dir)
    elif benchmark == "permuted-fashion-mnist":
        tasks = permuted_fashion_mnist(n, data_dir=data_dir, seed=seed)
    elif benchmark.startswith("split-cifar"):
        tasks = split_cifar(benchmark.removeprefix("split-"), n, data_dir=data_dir)
    else:
        tasks = split_digits(n, seed=seed)
    classes = int(tasks[0][1].max()) + 1
    if config.get("scenario") == "class-incremental" and config["method"] == "finetune":
        tasks = class_incremental(tasks)  # one shared head over every class of the sequence
        classes = int(tasks[-1][1].max()) + 1
    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's RNG
        torch.manual_seed(seed)
        model = build_model(config["model"], n, classes, s_max=config["s_max"],
                            input_shape=tuple(tasks[0][0].shape[1:]), hidden=config["hidden"],
                            mask_init=config["mask_init"])
    optimizer = build_optimizer(config["optimizer"], model.parameters(), config["lr"])
    return tasks, model, optimizer, torch.Generator().manual_seed(seed)


def forget(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``hat-cl forget``: load the run checkpointed in ``args.run``, forget task ``args.task``
    (``hat.forget_task``) and write the result as a new run folder ``args.out`` (checkpoint,
    ``forget.json``, ``capacity.png``), resumable with ``hat-cl run --resume``. Logs the capacity
    before and after, and the remaining tasks' accuracies (the same before and after)."""
    import json
    from pathlib import Path

    import hat
    from hat.app import checkpoint as _checkpoint
    from hat.app import plots as _plots
    from hat.app.experiment import capacity_report, evaluate

    folder = _checkpoint.locate(Path(args.run))
    meta = _checkpoint.read_meta(folder)
    config = meta["args"]
    if config.get("method") != "hat":
        raise _checkpoint.CheckpointError(f"forget: the run in {args.run} is a {config.get('method')} run; only HAT "
                                          "runs have tasks to forget")
    tasks, model, optimizer, generator = _build_run(config)
    _checkpoint.load(folder, meta, model, optimizer, generator)
    from hat.forget import check_trained_task

    task_id = check_trained_task(model, args.task, name="--task")
    out = Path(args.out) if args.out is not None else Path(f"{Path(args.run).resolve()}-without-task-{task_id}")
    if (out / "checkpoint").exists():
        raise _checkpoint.CheckpointError(f"forget: {out} already holds a checkpoint; pass another --out")
    before = capacity_report(model)
    kept = [t for t in hat.trained_tasks(model) if t != task_id]
    acc_before = {t: evaluate(model, tasks[t][2], tasks[t][3], t) for t in kept}
    result = hat.forget_task(model, task_id)
    after = capacity_report(model)
    acc_after = {t: evaluate(model, tasks[t][2], tasks[t][3], t) for t in kept}
    reset = sum(int(v.sum()) for v in result.values())
    log(f"Forgot task {task_id} of {args.run}: {reset:,} entries reset or re-initialised")
    log("\nCapacity before:")
    for line in _capacity_table(before):
        log(line)
    log("\nCapacity after:")
    for line in _capacity_table(after):
        log(line)
    log("\nAccuracy of the tasks kept (before -> after): " + ", ".join(
        f"task {t} {100 * acc_before[t]:.2f} -> {100 * acc_after[t]:.2f} %" for t in kept))
    forgotten = sorted({*meta.get("forgotten", []), task_id})
    _checkpoint.save(out, model, optimizer, generator, {**{k: v for k, v in meta.items() if k not in ("format",
                     "optimizer")}, "forgotten": forgotten})
    summary = {"run": str(args.run), "task": task_id, "forgotten": forgotten, "capacity_before": before,
               "capacity": after, "accuracy_before": acc_before, "accuracy_after": acc_after, "args": config}
    (out / "forget.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plots.capacity(summary, out / "capacity.png")
    log(f"\nWrote {out} (resume it with: hat-cl run --resume {out} ...)")
    return summary


# settings a resumed run may change: where files go, how often to save, what to print
_RESUMABLE = {"command", "out", "resume", "checkpoint_every", "stop_after", "compare", "data_dir", "export"}


def _check_same_settings(saved: dict[str, Any], now: dict[str, Any]) -> None:
    from hat.app.checkpoint import CheckpointError

    # checkpoints from before these options
    saved = {"scenario": "task-incremental", "nproc": 1, "world_size": 1, **saved}
    differ = [f"{k}={saved.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
              if k not in _RESUMABLE and saved.get(k) != now.get(k)]
    if differ:
        hint = ""
        if saved["world_size"] != now.get("world_size", 1):  # the shards, and the batches per epoch, would differ
            n = saved["world_size"]
            hint = (f"; it was written by {n} processes: resume it with hat-cl run --nproc {n} (or torchrun "
                    f"--nproc-per-node {n})" if n > 1 else "; it was written by one process: resume it alone")
        raise CheckpointError("--resume: the checkpoint was made with other settings: " + ", ".join(differ) + hint)


def _progress(label: str) -> Any:
    """A tqdm bar per task and epoch on a terminal; nothing otherwise (logs, tests, pipes)."""

    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None

    def bar(task: int, epoch: int, total: int) -> Any:
        return tqdm(total=total, desc=f"{label} task {task} epoch {epoch + 1}", leave=False, unit="batch")

    return bar


def format_results(results: dict[str, Any]) -> str:
    """The accuracy matrix (percent), average accuracy and BWT (percentage points) as text."""
    a = results["args"]
    matrix = results["matrix"]
    n = len(matrix)
    lines = [
        f"{a['benchmark']}  model={a['model']}  method={a['method']}  optimizer={a['optimizer']}  lr={a['lr']:g}  "
        f"epochs={a['epochs']}  batch={a['batch_size']}  s_max={a['s_max']:g}  reg={a['reg']:g}  seed={a['seed']}"
        + ("  scenario=class-incremental" if a.get("scenario") == "class-incremental" else ""),
        "",
        "Accuracy (%): row = after training task t, column = task k",
        "          " + "".join(f"{f'task {k}':>8}" for k in range(n)),
    ]
    for t, row in enumerate(matrix):
        lines.append(f"after {t:<4}" + "".join(f"{100 * acc:8.1f}" for acc in row))
    lines += [
        "",
        f"Average accuracy: {_fixed(100 * results['average_accuracy'], 2)} %",
        f"BWT: {_fixed(100 * results['bwt'], 3)} pp",
        f"Forgetting: {_fixed(100 * results.get('forgetting', 0.0), 3)} pp",
    ]
    if results.get("cil_matrix"):
        lines += ["", "Class-incremental accuracy (%), no task id given: row = after training task t, column = "
                      "task k's test samples among every class seen so far",
                  "          " + "".join(f"{f'task {k}':>8}" for k in range(n))]
        for t, row in enumerate(results["cil_matrix"]):
            lines.append(f"after {t:<4}" + "".join(f"{100 * acc:8.1f}" for acc in row))
        summary = f"Class-incremental accuracy: {results['cil_accuracy']:.2f} %"
        if results.get("task_prediction_accuracy") is not None:
            summary += (f"  (task prediction {results['task_prediction_accuracy']:.2f} %, task-incremental "
                        f"{results['til_accuracy']:.2f} %)")
        lines += ["", summary]
    if results.get("capacity"):
        lines += ["", *_capacity_table(results["capacity"])]
    if results.get("export"):
        from hat.app.export import format_export

        lines += ["", format_export(results["export"], results["args"]["export"])]
    lines += ["", f"Time: {results['seconds']:.1f} s"]
    return "\n".join(lines)


def _capacity_table(report: dict[str, dict[str, Any]]) -> list[str]:
    """Per layer, a row per trained task (units it uses = shared with earlier tasks + added) and
    a ``free`` row in the ``added`` column, so that column sums to the layer's units."""
    width = max(5, *(len(name) for name in report))
    lines = ["Capacity (units): a task uses = shares with earlier tasks + adds; free = used by no trained task",
             f"  {'layer':<{width}}  units   task   used  shared  added"]
    for name, layer in report.items():
        head = f"  {name:<{width}}  {layer['units']:>5}"
        for t in layer["tasks"]:
            lines.append(f"{head}  {t['task']:>5}  {t['used']:>5}  {t['shared']:>6}  {t['added']:>5}")
            head = " " * len(head)
        lines.append(f"{head}   free  {'':>5}  {'':>6}  {layer['free']:>5}  "
                     f"({100 * layer['free'] / layer['units']:.1f} %)")
    return lines


def _capacity_line(task: int, report: dict[str, dict[str, Any]]) -> str:
    """One line after a task: each layer's units that task uses and adds, and the units still free."""
    parts = [f"{name} {t['used']}/{t['added']}/{layer['free']}" for name, layer in report.items()
             for t in layer["tasks"] if t["task"] == task]
    return f"task {task} trained; units used/added/free: " + ", ".join(parts)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``hat-cl run --nproc N ...``: the same command in N processes under torchrun (its exit code)."""
    import subprocess

    rest, skip = [], False
    for a in argv:  # the processes get the command without --nproc
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               "-m", "hat", *rest]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hat`` and ``hat-cl``; returns the exit code."""
    import json
    from pathlib import Path

    from hat.app.checkpoint import CheckpointError
    from hat.app.experiment import DataNotFoundError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.budget is not None and (args.nproc > 1
                                                              or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        parser.error("--budget runs in one process only for now: compress ranks units on each rank's own data, "
                     "so the ranks' masks would differ; run without --nproc or torchrun")
    if args.command == "run" and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args, list(sys.argv[1:] if argv is None else argv))
    if args.command == "forget":
        from hat.errors import HATError

        try:
            forget(args, log=_print_now)
        except (DataNotFoundError, CheckpointError, HATError) as err:
            parser.exit(2, f"hat-cl forget: {err}\n")
        return 0
    if args.command == "run":
        if args.tasks is not None and args.tasks > MAX_TASKS[args.benchmark]:
            parser.error(f"argument --tasks: {args.benchmark} has {MAX_TASKS[args.benchmark]} tasks; got {args.tasks}")
        if args.checkpoint_every == "task" and args.out is None:
            parser.error("--checkpoint-every task needs --out DIR (the checkpoint goes to DIR/checkpoint)")
        if args.resume is not None and args.out is None:
            args.out = args.resume  # keep writing where the run was
        try:
            results = [run(args, log=_print_now)]
            if args.compare:
                other = "finetune" if args.method == "hat" else "hat"
                # the comparison run starts fresh and leaves the checkpoint alone
                results.append(run(argparse.Namespace(**{**vars(args), "method": other, "checkpoint_every": "never",
                                                         "resume": None, "stop_after": None}),
                                   log=_print_now))
        except (DataNotFoundError, CheckpointError) as err:
            parser.exit(2, f"hat-cl run: {err}\n")
        rank, world = _distributed()
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
        if rank != 0:  # rank 0 alone prints and writes
            return 0
        print("\n\n".join(format_results(r) for r in results), flush=True)
        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            payload = results[0] if len(results) == 1 else {"runs": results}
            tmp = out / "results.json.tmp"
            tmp.write_text(json.dumps(payload, indent=2) + "\n")
            tmp.replace(out / "results.json")  # atomic: a reader never sees half a file
            from hat.app import plots as _plots

            _plots.accuracy_matrix(results[0], out / "accuracy_matrix.png")
            if results[0]["capacity"]:
                _plots.capacity(results[0], out / "capacity.png")
            if len(results) > 1:
                _plots.accuracy_matrix(results[1], out / f"accuracy_matrix_{results[1]['args']['method']}.png")
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # a None default is spelled out in the option's own help
    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _print_now(line: str) -> None:
    print(line, flush=True)


def _budget(text: str) -> float:
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {text}")
    return value


def _fixed(value: float, digits: int) -> str:
    # round first, then add 0.0: turns -0.0 (from a tiny negative or an exact -0.0) into 0.0
    return f"{round(value, digits) + 0.0:.{digits}f}"


def _model_name(text: str) -> str:
    from hat.app.experiment import MODELS, timm_model_names

    if text in MODELS or (text.startswith("hat_") and text in timm_model_names()):
        return text
    valid = [*MODELS, *timm_model_names()]
    raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(repr(v) for v in valid)})")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _float_at_least(lowest: float, strict: bool):
    """An argparse type: a finite float above ``lowest`` (or equal to it when not ``strict``)."""
    what = "a positive number" if strict else "a non-negative number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (value > lowest if strict else value >= lowest) or value == float("inf"):  # nan fails both
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
        return value

    return parse


_positive_float = _float_at_least(0.0, strict=True)
_non_negative_float = _float_at_least(0.0, strict=False)
