"""DistributedDataParallel with 2 gloo processes on CPU: a converted MLP, a converted CNN with
BatchNorm, a CNN built from hat.modules (called with payloads) and timm's hat_resnet18s train 3
digit tasks, each rank on its own shard, one AdamW for the sequence
(``find_unused_parameters=False``). Parameters stay
identical across ranks, and on every rank each earlier task's evaluation outputs stay
bit-identical (each rank keeps its own BatchNorm rows: a broadcast of rank 0's rows would change a
finished task's statistics on the others)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hat
from hat import HATPayload

TASKS = 3
WORLD = 2
EPOCHS = 6


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2)),
        "cnn": nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(512, 2)),
    }


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from hat.app.experiment import build_model, split_digits

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    tasks = split_digits(TASKS)
    x_eval = torch.cat([t[2] for t in tasks])
    report = {}
    models = {name: hat.convert(plain, hat.HATConfig(num_tasks=TASKS)) for name, plain in _models().items()}
    torch.manual_seed(0)
    models["payload cnn"] = build_model("cnn", TASKS, 2)  # hat.modules layers, called with payloads
    try:
        import timm

        importlib.import_module("hat.timm_models")  # registers the hat_* models with timm
    except ImportError:  # timm is an extra
        pass
    else:
        torch.manual_seed(0)
        models["timm hat_resnet18s"] = timm.create_model("hat_resnet18s", hat_config=hat.HATConfig(num_tasks=TASKS),
                                                         num_classes=2, in_chans=1)
    for name, model in models.items():  # converted (or built) first, then wrapped
        payload = name.startswith("payload")
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
        forward = "payload" if payload else "set_task"
        first: dict[int, torch.Tensor] = {}
        checks = {"params_identical": [], "earlier_equal": [], "accuracy": []}
        for t in range(TASKS):
            x, y = tasks[t][0][rank::WORLD], tasks[t][1][rank::WORLD]  # this rank's shard
            batches = len(x) // 32  # the same on both ranks: every rank runs the same schedule
            for _ in range(EPOCHS):
                for b in range(batches):
                    scale = hat.utils.get_hat_mask_scale("linear", 100.0, b / max(batches - 1, 1))
                    xb, yb = x[32 * b:32 * b + 32], y[32 * b:32 * b + 32]
                    if payload:
                        logits = ddp(HATPayload(xb, task_id=t, mask_scale=scale)).data
                    else:
                        hat.set_task(model, t, mask_scale=scale)
                        logits = ddp(xb)
                    loss = F.cross_entropy(logits, yb)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            for k in range(t + 1):
                out_k = hat.training.predict(model, x_eval, k, forward=forward)
                if k in first:
                    checks["earlier_equal"].append(bool(torch.equal(out_k, first[k])))
                else:
                    first[k] = out_k
            flat = torch.cat([p.detach().flatten() for p in model.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
            dist.all_gather(gathered, flat)
            checks["params_identical"].append(all(torch.equal(gathered[0], g) for g in gathered))
            checks["accuracy"].append(hat.training.evaluate(model, (tasks[t][2], tasks[t][3]), t, forward=forward))
        report[name] = checks
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_gloo_processes_keep_ranks_identical_and_earlier_tasks_exact(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, checks in report.items():
            assert checks["params_identical"] == [True] * TASKS, (rank, name)
            assert len(checks["earlier_equal"]) == TASKS * (TASKS - 1) // 2
            assert all(checks["earlier_equal"]), (rank, name, checks["earlier_equal"])
            # a ResNet on 8x8 digits for a few dozen steps learns less; its protection is what is checked
            assert min(checks["accuracy"]) > (0.6 if name.startswith("timm") else 0.9), (rank, name, checks["accuracy"])
        assert "timm hat_resnet18s" in report or importlib.util.find_spec("timm") is None


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(WORLD), "-m", "hat", "run", "--benchmark", "split-digits", "--tasks", "3",
                           "--model", "cnn", *argv], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_the_cli_under_torchrun_writes_one_result_with_zero_bwt_and_resumes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # hat-cl run --nproc 2 launches torchrun itself: the uninterrupted run, the reference below
    launched = subprocess.run([sys.executable, "-m", "hat", "run", "--nproc", str(WORLD), "--benchmark", "split-digits",
                               "--tasks", "3", "--model", "cnn", "--epochs", "3", "--out", str(tmp_path / "nproc")],
                              capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0, launched.stderr[-2000:]
    assert launched.stdout.count("Accuracy (%): row = after training task t") == 1  # rank 0 alone prints
    results = json.loads((tmp_path / "nproc" / "results.json").read_text())
    assert results["bwt"] == 0.0 and len(results["matrix"]) == 3
    # torchrun typed by the user: a run stopped after 2 tasks and resumed with the same number of
    # processes ends with the uninterrupted run's matrix
    part = _torchrun("--epochs", "3", "--out", str(tmp_path / "part"), "--checkpoint-every", "task",
                     "--stop-after", "2")
    assert part.returncode == 0, part.stderr[-2000:]
    # with another number of processes the shards and the batches per epoch differ: refused
    alone = subprocess.run([sys.executable, "-m", "hat", "run", "--benchmark", "split-digits", "--tasks", "3",
                            "--model", "cnn", "--epochs", "3", "--resume", str(tmp_path / "part")],
                           capture_output=True, text=True, timeout=120, env=env)
    assert alone.returncode != 0 and "world_size=2 (now 1)" in alone.stderr, alone.stderr[-2000:]
    assert f"hat-cl run --nproc {WORLD}" in alone.stderr
    resumed = _torchrun("--epochs", "3", "--resume", str(tmp_path / "part"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("Accuracy (%): row = after training task t") == 1
    resumed_results = json.loads((tmp_path / "part" / "results.json").read_text())
    assert resumed_results["bwt"] == 0.0 and resumed_results["matrix"] == results["matrix"]
    refused = _torchrun("--budget", "1.0")
    assert refused.returncode != 0 and "--budget runs in one process only" in refused.stderr
    refused = subprocess.run([sys.executable, "-m", "hat", "run", "--nproc", "2", "--budget", "1.0"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "--budget runs in one process only" in refused.stderr


class _PerTaskHeads(nn.Module):
    """A converted trunk and one plain head per task (hat-cl's examples use this)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(32, 2) for _ in range(2))
        self.task = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads[self.task](self.trunk(x))


def _misuse_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 2, (16,))
    errors = {}
    # 1. wrapped first, converted after: DDP does not know the task embeddings
    plain = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    ddp = nn.parallel.DistributedDataParallel(plain)
    model = hat.convert(plain, hat.HATConfig(num_tasks=2))  # in place: ddp.module is the converted model
    hat.set_task(model, 0, mask_scale=10.0)
    try:
        ddp(x)
    except Exception as err:  # noqa: BLE001 - the test reports what was raised
        errors["converted after wrapping"] = [type(err).__name__, str(err)]
    # 2. per-task plain heads without find_unused_parameters: the head of the other task gets no gradient
    model = _PerTaskHeads()
    hat.convert(model.trunk, hat.HATConfig(num_tasks=2))
    ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    try:
        for _ in range(2):
            hat.set_task(model.trunk, 0, mask_scale=10.0)
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            optimizer.step()
    except Exception as err:  # noqa: BLE001
        errors["per-task heads"] = [type(err).__name__, str(err)]
    with open(os.path.join(out, f"misuse{rank}.json"), "w") as f:
        json.dump(errors, f)
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_what_ddp_cannot_do_with_hat_is_a_clear_error_on_every_rank_not_a_hang(tmp_path):
    context = torch.multiprocessing.spawn(_misuse_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                                          join=False)
    for _ in range(120):  # at most 2 minutes: a hang fails the test instead of the suite
        if context.join(timeout=1):
            break
    else:
        for p in context.processes:
            p.kill()
        pytest.fail("the processes hung")
    for rank in range(WORLD):
        errors = json.loads((tmp_path / f"misuse{rank}.json").read_text())
        kind, text = errors["converted after wrapping"]
        assert kind == "HATTypeError" and "task_embedding" in text and "then wrap it" in text, text
        kind, text = errors["per-task heads"]
        assert "find_unused_parameters=True" in text, text
