"""``python -m hat run``: a continual-learning run on real data, printed as an accuracy matrix.

Reproduces ``make demo``::

    python -m hat run --benchmark split-digits --model mlp --epochs 5 --optimizer adamw --lr 1e-3 --seed 0

:func:`main` parses and prints; :func:`run` does the work and returns the numbers. Neither
changes global state: weight initialization draws from a forked, seeded global RNG, and the
rest from local ``torch.Generator`` objects.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "run", "build_parser", "format_results"]

BENCHMARKS = ("split-digits",)
# SGD needs a larger step than Adam's; 0.05 is the paper's SGD learning rate
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.05}


def build_parser() -> argparse.ArgumentParser:
    from hat.experiment import METHODS, MODELS, OPTIMIZERS

    parser = argparse.ArgumentParser(prog="python -m hat", description="HAT (Hard Attention to the Task) continual learning.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = commands.add_parser(
        "run", help="train a task sequence and print the accuracy matrix, average accuracy and BWT",
        description="Train the tasks of a benchmark in order with one optimizer; after each task, evaluate "
                    "every task seen so far. Prints the accuracy matrix, the final average accuracy and the "
                    "backward transfer (BWT, negative = forgetting).",
        formatter_class=_HelpFormatter,
    )
    r.add_argument("--benchmark", choices=BENCHMARKS, default="split-digits",
                   help="split-digits: scikit-learn's 8x8 digits, task t = digit 2t vs 2t+1")
    r.add_argument("--model", choices=MODELS, default="mlp",
                   help="mlp: HATLinear 64-256-256; cnn: two HATConv2d+BatchNorm blocks, HATLinear 64; "
                        "both with one linear head per task")
    r.add_argument("--method", choices=METHODS, default="hat",
                   help="hat: task t trains and is evaluated with task_id=t (its masks and its own head), "
                        "earlier tasks protected exactly; finetune: the same network with task_id=None "
                        "throughout: no masks, no protection, and the one shared head (labels 0/1 of every "
                        "task on the same two outputs), the baseline that forgets")
    r.add_argument("--tasks", type=int, choices=range(1, 6), default=5, metavar="{1..5}", help="number of tasks")
    r.add_argument("--epochs", type=_positive_int, default=5, help="epochs per task")
    r.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="one optimizer for the whole sequence; adamw: weight decay 0.01; sgd: momentum 0.9")
    r.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    r.add_argument("--batch-size", type=_positive_int, default=32, help="batch size")
    r.add_argument("--s-max", type=_positive_float, default=400.0,
                   help="largest mask scale; annealed linearly from 1/s_max within each epoch (paper: 400)")
    r.add_argument("--reg", type=_non_negative_float, default=0.75, help="weight c of the mask regularizer (paper: 0.75)")
    r.add_argument("--seed", type=int, default=0, help="seeds the data split, weight init and batch order")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the experiment ``args`` describes (as :func:`build_parser` parses them).

    Returns ``matrix`` (``matrix[t][k]``: accuracy in [0, 1] on task ``k`` after training task
    ``t``), ``average_accuracy``, ``bwt`` (both as fractions), ``seconds`` and ``args`` (a dict,
    with the learning rate filled in).
    """
    import torch

    from hat.experiment import average_accuracy, backward_transfer, build_model, build_optimizer, run_sequence, split_digits

    config = vars(args).copy()
    if config["lr"] is None:
        config["lr"] = DEFAULT_LR[args.optimizer]
    start = time.perf_counter()
    tasks = split_digits(args.tasks, seed=args.seed)
    classes = int(tasks[0][1].max()) + 1
    with torch.random.fork_rng(devices=[]):  # seeded weight init without touching the caller's RNG
        torch.manual_seed(args.seed)
        model = build_model(args.model, args.tasks, classes, s_max=args.s_max, input_shape=tuple(tasks[0][0].shape[1:]))
    optimizer = build_optimizer(args.optimizer, model.parameters(), config["lr"])
    matrix = run_sequence(model, optimizer, tasks, method=args.method, epochs=args.epochs, batch_size=args.batch_size,
                          s_max=args.s_max, reg=args.reg, generator=torch.Generator().manual_seed(args.seed))
    return {
        "matrix": matrix,
        "average_accuracy": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "seconds": time.perf_counter() - start,
        "args": config,
    }


def format_results(results: dict[str, Any]) -> str:
    """The accuracy matrix (percent), average accuracy and BWT (percentage points) as text."""
    a = results["args"]
    matrix = results["matrix"]
    n = len(matrix)
    lines = [
        f"{a['benchmark']}  model={a['model']}  method={a['method']}  optimizer={a['optimizer']}  lr={a['lr']:g}  "
        f"epochs={a['epochs']}  batch={a['batch_size']}  s_max={a['s_max']:g}  reg={a['reg']:g}  seed={a['seed']}",
        "",
        "Accuracy (%): row = after training task t, column = task k",
        "          " + "".join(f"{f'task {k}':>8}" for k in range(n)),
    ]
    for t, row in enumerate(matrix):
        lines.append(f"after {t:<4}" + "".join(f"{100 * acc:8.1f}" for acc in row))
    lines += [
        "",
        f"Average accuracy: {_fixed(100 * results['average_accuracy'], 1)} %",
        f"BWT: {_fixed(100 * results['bwt'], 3)} pp",
        f"Time: {results['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hat`` and ``hat-cl``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        print(format_results(run(args)), flush=True)
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # a None default is spelled out in the option's own help
    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _fixed(value: float, digits: int) -> str:
    # round first, then add 0.0: turns -0.0 (from a tiny negative or an exact -0.0) into 0.0
    return f"{round(value, digits) + 0.0:.{digits}f}"


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
