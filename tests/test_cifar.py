"""split-cifar10 / split-cifar100 from a local copy of the python batches (made here, small)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from hat.app.cli import build_parser, main, run
from hat.app.experiment import DataNotFoundError, split_cifar


def _write_batches(folder, files, label_key, classes, per_file, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name in files:
        labels = np.arange(per_file) % classes
        # each class a different mean brightness, so that a task is learnable
        data = (rng.integers(0, 60, (per_file, 3072)) + (labels[:, None] * 180 // classes)).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, label_key: labels.tolist()}, f)


@pytest.fixture
def cifar10_dir(tmp_path):
    _write_batches(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                   b"labels", 10, per_file=40)
    return tmp_path


def test_cifar10_split_in_class_order(cifar10_dir):
    tasks = split_cifar("cifar10", data_dir=cifar10_dir)
    assert len(tasks) == 5
    x_tr, y_tr, x_te, _ = tasks[2]
    assert x_tr.shape == (40, 3, 32, 32) and x_te.shape == (8, 3, 32, 32)  # 5 files x 8 of classes 4 and 5
    assert set(y_tr.tolist()) == {0, 1} and float(x_tr.max()) <= 1.0


def test_cifar100_has_ten_tasks_of_ten_classes(tmp_path):
    _write_batches(tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels", 100, per_file=200)
    tasks = split_cifar("cifar100", data_dir=tmp_path / "cifar-100-python")
    assert len(tasks) == 10 and set(tasks[9][1].tolist()) == set(range(10))
    with pytest.raises(ValueError, match=r"num_tasks must be an int in \[1, 10\]"):
        split_cifar("cifar100", 11, data_dir=tmp_path)


def test_cli_on_local_cifar10_keeps_earlier_tasks(cifar10_dir):
    results = run(build_parser().parse_args(["run", "--benchmark", "split-cifar10", "--data-dir", str(cifar10_dir),
                                              "--tasks", "2", "--epochs", "2", "--model", "cnn"]))
    assert results["bwt"] == 0.0 and results["matrix"][1][0] == results["matrix"][0][0]


def test_missing_cifar_says_what_to_pass(tmp_path, capsys):
    with pytest.raises(DataNotFoundError, match="no --data-dir given"):
        split_cifar("cifar10")
    with pytest.raises(SystemExit) as exc:
        main(["run", "--benchmark", "split-cifar100", "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cifar-100-python" in err and str(tmp_path) in err


def test_class_incremental_hat_resnet18s_on_local_cifar10(cifar10_dir):
    pytest.importorskip("timm")
    results = run(build_parser().parse_args(["run", "--benchmark", "split-cifar10", "--data-dir", str(cifar10_dir),
                                              "--tasks", "2", "--epochs", "2", "--model", "hat_resnet18s",
                                              "--scenario", "class-incremental"]))
    assert results["bwt"] == 0.0
    assert [len(row) for row in results["cil_matrix"]] == [1, 2]
    # each class here has its own brightness: the tasks' masked ResNet features tell them apart
    assert results["task_prediction_accuracy"] > 75.0
    assert 0.0 <= results["cil_accuracy"] <= 100.0
