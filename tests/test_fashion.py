"""The split-fashion-mnist benchmark on the real Fashion-MNIST (Debian's dataset-fashion-mnist).

Where the data is missing these tests skip, except under CI (CI=true), where `.ci/run`
installs it first and a missing dataset is a failure.
"""

from __future__ import annotations

import gzip
import os

import pytest
import torch

from hat.app.experiment import DataNotFoundError, _find_fashion, _read_idx, split_fashion_mnist


@pytest.fixture(scope="module")
def fashion_tasks():
    try:
        return split_fashion_mnist(5)
    except DataNotFoundError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def test_split_in_class_order_with_the_official_test_set(fashion_tasks):
    assert len(fashion_tasks) == 5
    for x_tr, y_tr, x_te, y_te in fashion_tasks:
        assert x_tr.shape == (12000, 1, 28, 28) and x_te.shape == (2000, 1, 28, 28)
        assert x_tr.dtype == torch.float32 and float(x_tr.min()) >= 0.0 and float(x_tr.max()) <= 1.0
        assert int((y_tr == 0).sum()) == int((y_tr == 1).sum()) == 6000
        assert int((y_te == 0).sum()) == int((y_te == 1).sum()) == 1000


def test_cli_on_fashion_keeps_earlier_tasks_exactly(fashion_tasks):
    from hat.app.cli import build_parser, run

    results = run(build_parser().parse_args(["run", "--benchmark", "split-fashion-mnist", "--tasks", "2",
                                              "--epochs", "1", "--batch-size", "128", "--optimizer", "adam"]))
    matrix = results["matrix"]
    assert matrix[1][0] == matrix[0][0] and results["bwt"] == 0.0
    assert min(matrix[0][0], matrix[1][1]) >= 0.9, matrix


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "ok-idx1-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    assert _read_idx(good).tolist() == [7, 8, 9]
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7]))
    with pytest.raises(ValueError, match="truncated"):
        _read_idx(short)
    other = tmp_path / "other"
    other.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an IDX file"):
        _read_idx(other)
    with pytest.raises(DataNotFoundError, match=str(tmp_path)):
        _find_fashion(tmp_path)


def test_permuted_fashion_mnist_permutes_pixels_per_task(fashion_tasks):
    from hat.app.experiment import permuted_fashion_mnist

    tasks = permuted_fashion_mnist(3)
    (x0, y0, _, _), (x1, y1, _, _) = tasks[0], tasks[1]
    assert x0.shape == (60000, 1, 28, 28) and torch.equal(y0, y1) and set(y0.tolist()) == set(range(10))
    # task 0 is the original, task 1 the same pixels in another order
    assert torch.equal(x0.flatten(1).sort(1).values,
                       x1.flatten(1).sort(1).values)
    assert not torch.equal(x0, x1)
    assert not torch.equal(tasks[1][0], tasks[2][0])
