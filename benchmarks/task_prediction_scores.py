"""Which score tells a sample's task? First measurements for class-incremental learning (issue 16).

    python benchmarks/task_prediction_scores.py --seeds 0 1 2     # needs Debian's dataset-fashion-mnist

Split Fashion-MNIST, 5 tasks of 2 classes, the CLI's HAT MLP 784-400-400 (one head per task), Adam
lr 1e-3, batch 128, 2 epochs per task. After the last task, every test sample is scored under each
task's masks (hard masks, eval mode) and given to the best-scoring task; the class is then that
task's head's choice. Printed per score: task-prediction accuracy and class-incremental accuracy
(all 10 classes, no task id given). No sample is stored: what a score needs from a task's data
is statistics computed when the task ends (per-class means, a shared covariance).

Scores: the task head's max-softmax, energy (logsumexp) and max logit, raw and normalized by the
task's own training scores; a Mahalanobis distance to the task's class means on its masked
features (the head's input, or both hidden layers), on the raw pixels, and the two added.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from hat import HATPayload, training
from hat.app import experiment

TASKS = 5
Features = Callable[[torch.Tensor, int], torch.Tensor]


class Gaussians:
    """Per task: the class means and one shared covariance (shrunk) of ``features(x, t)`` on the
    task's training data, over the positions the task uses; the score of a sample is minus its
    smallest Mahalanobis distance to the task's class means."""

    def __init__(self, features: Features, tasks: list, shrink: float = 1e-3) -> None:
        self.features = features
        self.fitted = []
        for t, (x, y, _, _) in enumerate(tasks):
            f = features(x, t)
            used = f.abs().sum(0) > 0
            f = f[:, used]
            classes = y.unique()
            means = torch.stack([f[y == c].mean(0) for c in classes])
            centred = torch.cat([f[y == c] - means[i] for i, c in enumerate(classes)])
            cov = centred.T @ centred / len(centred)
            cov += shrink * cov.diagonal().mean() * torch.eye(cov.shape[0])
            self.fitted.append((used, means, torch.linalg.inv(cov)))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for t, (used, means, precision) in enumerate(self.fitted):
            f = self.features(x, t)[:, used]
            distances = torch.stack([((f - m) @ precision * (f - m)).sum(1) for m in means], 1)
            out.append(-distances.min(1).values)
        return torch.stack(out, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = experiment.split_fashion_mnist(TASKS, args.data_dir)
    x_all = torch.cat([t[2] for t in tasks])
    task_of = torch.cat([torch.full((len(t[3]),), i) for i, t in enumerate(tasks)])
    class_of = torch.cat([t[3] + 2 * i for i, t in enumerate(tasks)])
    for seed in args.seeds:
        measure(seed, tasks, x_all, task_of, class_of)


def measure(seed: int, tasks: list, x_all: torch.Tensor, task_of: torch.Tensor, class_of: torch.Tensor) -> None:
    """Train the sequence with ``seed`` and print every score's accuracies."""
    torch.manual_seed(seed)
    model = experiment.build_model("mlp", TASKS, 2, input_shape=(1, 28, 28), hidden=400)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for t, (x, y, _, _) in enumerate(tasks):
        training.train_task(model, optimizer, (x, y), t, epochs=2, batch_size=128, generator=generator,
                            max_scale=400)
    til = [training.evaluate(model, (x, y), t) for t, (_, _, x, y) in enumerate(tasks)]
    print(f"\nseed {seed}: trained in {time.perf_counter() - start:.0f} s; task-incremental accuracy "
          f"{100 * sum(til) / TASKS:.2f} %")

    hidden: list[torch.Tensor] = []
    model.relu.register_forward_hook(lambda module, inputs, output: hidden.append(output))

    @torch.no_grad()
    def run(x: torch.Tensor, t: int) -> torch.Tensor:
        hidden.clear()
        model.eval()
        return model(HATPayload(x, task_id=t)).data

    def both_layers(x: torch.Tensor, t: int) -> torch.Tensor:
        run(x, t)
        return torch.cat(hidden[:2], 1)

    def penultimate(x: torch.Tensor, t: int) -> torch.Tensor:
        run(x, t)
        return hidden[1].clone()

    def pixels(x: torch.Tensor, t: int) -> torch.Tensor:
        return x.flatten(1)

    logits = torch.stack([run(x_all, t) for t in range(TASKS)], 1)  # [samples, tasks, classes]

    def report(name: str, scores: torch.Tensor) -> None:
        task = scores.argmax(1)
        cls = logits[torch.arange(len(task)), task].argmax(-1) + 2 * task
        print(f"  {name:48s} task prediction {100 * (task == task_of).float().mean():6.2f} %, "
              f"class-incremental {100 * (cls == class_of).float().mean():6.2f} %")

    heads = {"max-softmax": lambda z: F.softmax(z, -1).amax(-1), "energy": lambda z: torch.logsumexp(z, -1),
             "max logit": lambda z: z.amax(-1)}
    for name, head_score in heads.items():
        raw = head_score(logits)
        own = [head_score(run(x[:4000], t)) for t, (x, _, _, _) in enumerate(tasks)]
        mean, std = torch.stack([o.mean() for o in own]), torch.stack([o.std() for o in own])
        report(f"head {name}", raw)
        report(f"head {name}, normalized by its own data", (raw - mean) / std)
    features = Gaussians(both_layers, tasks).scores(x_all)
    image = Gaussians(pixels, tasks).scores(x_all)
    report("Mahalanobis, the head's input", Gaussians(penultimate, tasks).scores(x_all))
    report("Mahalanobis, both hidden layers", features)
    report("Mahalanobis, pixels", image)
    report("Mahalanobis, both layers + pixels", features / features.std() + image / image.std())


if __name__ == "__main__":
    main()
