"""Split Fashion-MNIST: HAT against fine-tuning over three seeds (the README's figures).

    python benchmarks/fashion_mnist.py      # needs Debian's dataset-fashion-mnist (or --data-dir)

5 tasks of 2 classes in class order, task-incremental (one head per task), MLP 784-400-400,
Adam lr 1e-3, 2 epochs per task, batch 32, HAT with the paper's s_max 400 and c 0.75; the
fine-tuning run is the same network and settings with no task (no masks, one shared head).
"""

from __future__ import annotations

import argparse
import statistics

from hat.app.cli import build_parser, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    rows = {"hat": [], "finetune": []}
    for seed in args.seeds:
        for method in rows:
            argv = ["run", "--benchmark", "split-fashion-mnist", "--model", "mlp", "--optimizer", "adam",
                    "--lr", "1e-3",
                    "--epochs", "2", "--batch-size", "32", "--method", method, "--seed", str(seed)]
            if args.data_dir:
                argv += ["--data-dir", args.data_dir]
            result = run(build_parser().parse_args(argv))
            rows[method].append(result)
            print(f"seed {seed} {method:8s}: average accuracy {100 * result['average_accuracy']:.2f} %, "
                  f"BWT {100 * result['bwt'] + 0.0:.3f} pp", flush=True)
    for method, results in rows.items():
        acc = [100 * r["average_accuracy"] for r in results]
        bwt = [100 * r["bwt"] for r in results]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"{method:8s}: average accuracy {statistics.mean(acc):.2f} +- {spread:.2f} %, "
              f"BWT {statistics.mean(bwt) + 0.0:.3f} pp (worst {min(bwt) + 0.0:.3f})")


if __name__ == "__main__":
    main()
