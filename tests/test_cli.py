"""``python -m hat run``, in process: the accuracy matrix, exact zero BWT for HAT, forgetting for fine-tuning."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from hat.app.cli import build_parser, format_results, main, run
from hat.app.experiment import average_accuracy, backward_transfer, forgetting

QUICK = ["run", "--benchmark", "split-digits", "--tasks", "3", "--epochs", "2"]


def _run(*extra: str) -> dict:
    return run(build_parser().parse_args([*QUICK, *extra]))


def test_main_prints_matrix_and_zero_bwt(capsys):
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    assert main([*QUICK, "--model", "mlp", "--optimizer", "adamw", "--lr", "1e-3", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "task 0" in out and "task 2" in out and "after 2" in out
    assert "Average accuracy" in out
    assert "BWT: 0.000 pp" in out
    # no global side effects for in-process callers
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("model, epochs", [("mlp", "2"), ("cnn", "3")])
def test_hat_keeps_earlier_tasks_exactly(model, epochs):
    results = _run("--model", model, "--epochs", epochs)
    matrix = results["matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3]
    for k in range(3):
        assert matrix[k][k] >= 0.9, f"task {k} reached only {matrix[k][k]:.3f}"
        assert all(matrix[t][k] == matrix[k][k] for t in range(k, 3)), f"task {k} changed: {matrix}"
    assert results["bwt"] == 0.0
    assert results["average_accuracy"] == sum(matrix[-1]) / 3


def test_same_seed_same_results():
    assert _run("--seed", "1")["matrix"] == _run("--seed", "1")["matrix"]


def test_finetune_forgets():
    matrix = _run("--method", "finetune", "--epochs", "3")["matrix"]
    last = len(matrix) - 1
    assert min(matrix[last][k] - matrix[k][k] for k in range(last)) < 0, matrix
    assert backward_transfer(matrix) < 0


@pytest.mark.parametrize("argv, message", [
    (["run", "--model", "resnet"], "invalid choice: 'resnet' (choose from 'mlp', 'cnn', 'hat_resnet18'"),
    (["run", "--benchmark", "cifar"], "invalid choice: 'cifar'"),
    (["run", "--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["run", "--method", "ewc"], "invalid choice: 'ewc'"),
    (["run", "--tasks", "6"], "split-digits has 5 tasks; got 6"),
    (["run", "--tasks", "0"], "must be a positive integer"),
    (["run", "--epochs", "0"], "must be a positive integer"),
    (["run", "--lr", "-1"], "must be a positive number"),
    ([], "required"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_metrics():
    matrix = [[1.0], [0.5, 0.75], [0.25, 0.75, 1.0]]
    assert average_accuracy(matrix) == 2.0 / 3
    assert backward_transfer(matrix) == ((0.25 - 1.0) + (0.75 - 0.75)) / 2
    assert backward_transfer([[0.9]]) == 0.0
    # forgetting: the drop from each task's best earlier accuracy
    assert forgetting(matrix) == ((1.0 - 0.25) + (0.75 - 0.75)) / 2
    assert forgetting([[0.5], [0.9, 0.8], [0.7, 0.8, 0.6]]) == ((0.9 - 0.7) + (0.8 - 0.8)) / 2
    assert forgetting([[0.9]]) == 0.0


def test_compare_and_out_write_both_runs(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    assert main([*QUICK, "--epochs", "3", "--compare", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "method=hat" in text and "method=finetune" in text and text.count("Capacity (units)") == 1
    saved = json.loads((out / "results.json").read_text())
    hat_run, finetune_run = saved["runs"]
    assert hat_run["args"]["method"] == "hat" and hat_run["bwt"] == 0.0 and hat_run["forgetting"] == 0.0
    assert finetune_run["args"]["method"] == "finetune" and finetune_run["bwt"] < 0
    assert hat_run["capacity"]["fc1"]["units"] == 256 and finetune_run["capacity"] == {}
    assert not (out / "results.json.tmp").exists()
    for png in ("accuracy_matrix.png", "capacity.png", "accuracy_matrix_finetune.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_results_table_and_plot_hold_hat_capacity_of_the_trained_model(tmp_path, capsys):
    import json
    import re

    import numpy as np
    from matplotlib.image import imread
    from safetensors.torch import load_file

    import hat
    from hat.app.experiment import build_model

    out = tmp_path / "run"
    assert main([*QUICK, "--checkpoint-every", "task", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())["capacity"]
    model = build_model("mlp", num_tasks=3, classes_per_task=2)
    model.load_state_dict(load_file(str(out / "checkpoint" / "model.safetensors")))  # the model after the last task
    report = hat.capacity(model)
    assert list(saved) == [layer.name for layer in report] == ["fc1", "fc2"]
    for layer in report:
        entry = saved[layer.name]
        assert entry == {"units": layer.units, "tasks": [t._asdict() for t in layer.tasks], "free": layer.free}
        assert [t["task"] for t in entry["tasks"]] == [0, 1, 2]
        assert sum(t["added"] for t in entry["tasks"]) + entry["free"] == entry["units"] == 256
        assert all(t["used"] == t["shared"] + t["added"] and t["used"] > 0 for t in entry["tasks"])
        assert entry["tasks"][0]["shared"] == 0 and entry["free"] < 256
        # the table: a row per task (used, shared, added), then the free units in the added column
        for t in entry["tasks"]:
            row = rf"^ +{layer.name + ' +256' if t['task'] == 0 else ''} +{t['task']} +{t['used']} +{t['shared']} "
            assert re.search(row + rf"+{t['added']}$", text, re.MULTILINE), (layer.name, t, text)
        assert re.search(rf"^ +free +{entry['free']}  \({100 * entry['free'] / 256:.1f} %\)$", text, re.MULTILINE)
        # the line printed after the last task: used/added by task 2, and what is left free
        t2 = entry["tasks"][2]
        assert f"{layer.name} {t2['used']}/{t2['added']}/{entry['free']}" in text
    assert text.count("units used/added/free") == 3 and "used  shared  added" in text
    # task 0's bars (tab:blue) and the free units' (grey) are drawn: far more pixels than their legend patches
    image = imread(out / "capacity.png")[..., :3]
    for colour in ((0x1F, 0x77, 0xB4), (0xC8, 0xC8, 0xC8)):
        assert (abs(image - np.array(colour) / 255).max(-1) < 0.02).sum() > 1000, colour


def test_missing_fashion_data_says_where_it_looked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--benchmark", "split-fashion-mnist", "--data-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err


def test_tiny_negative_bwt_prints_as_zero():
    args = vars(build_parser().parse_args(["run"])) | {"lr": 1e-3}
    text = format_results({"matrix": [[1.0], [1.0, 1.0]], "average_accuracy": 1.0, "bwt": -1e-12,
                           "seconds": 0.0, "args": args})
    assert "BWT: 0.000 pp" in text


def test_import_hat_stays_light():
    code = "import sys, hat, hat.app.cli, hat.app.experiment; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_timm_model_runs_and_keeps_earlier_tasks_exactly():
    pytest.importorskip("timm")
    results = _run("--model", "hat_resnet18s", "--tasks", "2", "--epochs", "1", "--batch-size", "64")
    assert results["bwt"] == 0.0 and results["matrix"][1][0] == results["matrix"][0][0]
    assert "layer1.0.conv1" in results["capacity"]


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_export_writes_pruned_programs_that_compute_each_task(model, tmp_path, capsys):
    import json

    from hat import training
    from hat.app.experiment import split_digits

    folder = tmp_path / "export"
    main(["run", "--model", model, "--epochs", "1", "--tasks", "2", "--hidden", "32", "--out", str(tmp_path / "run"),
          "--checkpoint-every", "task", "--export", str(folder)])
    printed = capsys.readouterr().out
    assert f"Exported pruned models to {folder}" in printed
    rows = json.loads((folder / "export.json").read_text())
    assert [r["task"] for r in rows] == [0, 1]
    assert all(r["params_pruned"] < r["params"] and r["flops_pruned"] < r["flops"] for r in rows)
    # the saved HAT model, reloaded, against each exported program on the task's test images
    from hat.app import checkpoint as ckpt
    from hat.app.experiment import build_model

    trained = build_model(model, 2, 2, hidden=32)
    folder_ckpt = ckpt.locate(tmp_path / "run")
    ckpt.load(folder_ckpt, ckpt.read_meta(folder_ckpt), trained, torch.optim.Adam(trained.parameters()),
              torch.Generator())
    for t, (_, _, x_test, _) in enumerate(split_digits(2)):
        program = torch.export.load(folder / f"task_{t}.pt2").module()
        want = training.predict(trained, x_test, t)
        got = program(x_test)
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_forget_writes_a_run_without_the_task_and_keeps_the_others_exactly(tmp_path, capsys):
    import json

    import hat
    from hat import training
    from hat.app import checkpoint as ckpt
    from hat.app.experiment import build_model, split_digits

    run_dir = tmp_path / "run"
    main(["run", "--model", "cnn", "--epochs", "1", "--tasks", "3", "--out", str(run_dir),
          "--checkpoint-every", "task"])
    capsys.readouterr()

    def reload(folder):
        model = build_model("cnn", 3, 2)
        found = ckpt.locate(folder)
        ckpt.load(found, ckpt.read_meta(found), model, torch.optim.AdamW(model.parameters()), torch.Generator())
        return model

    before = reload(run_dir)
    assert main(["forget", "--run", str(run_dir), "--task", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Capacity before:" in printed and "Capacity after:" in printed and "Forgot task 1" in printed
    out = tmp_path / "run-without-task-1"
    after = reload(out)
    assert hat.trained_tasks(after) == [0, 2]
    summary = json.loads((out / "forget.json").read_text())
    assert summary["forgotten"] == [1]
    assert json.loads((out / "checkpoint" / "meta.json").read_text())["forgotten"] == [1]
    freed = sum(layer["free"] for layer in summary["capacity"].values())
    assert freed >= sum(layer["free"] for layer in summary["capacity_before"].values())
    assert (out / "capacity.png").read_bytes()[:4] == b"\x89PNG"
    for t in (0, 2):
        x = split_digits(3)[t][2]
        assert torch.equal(training.predict(after, x, t), training.predict(before, x, t))
    # bad input: exit 2 with the reason, nothing written
    with pytest.raises(SystemExit) as err:
        main(["forget", "--run", str(run_dir), "--task", "5", "--out", str(tmp_path / "bad")])
    assert err.value.code == 2 and "--task must be an int in [0, 3); got 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["forget", "--run", str(out), "--task", "1", "--out", str(tmp_path / "bad")])
    assert "got 1, which has not been trained" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_budget_leaves_free_units_and_keeps_bwt_zero(capsys):
    plain = run(build_parser().parse_args([*QUICK, "--epochs", "2", "--tasks", "3"]))
    budgeted = run(build_parser().parse_args([*QUICK, "--epochs", "2", "--tasks", "3", "--budget", "0.5"]))
    assert budgeted["bwt"] == 0.0 and budgeted["forgetting"] == 0.0
    for name, layer in budgeted["capacity"].items():
        assert layer["free"] > plain["capacity"][name]["free"]
    with pytest.raises(SystemExit):
        main([*QUICK, "--budget", "1.5"])
    assert "argument --budget: must be in (0, 1]; got 1.5" in capsys.readouterr().err


def test_class_incremental_run_writes_its_keys_and_beats_a_shared_head(tmp_path, capsys):
    out = tmp_path / "cil"
    assert main([*QUICK, "--tasks", "5", "--epochs", "3", "--scenario", "class-incremental", "--compare",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Class-incremental accuracy (%), no task id given" in printed
    assert "task prediction" in printed and "scenario=class-incremental" in printed
    hat_run, finetune = json.loads((out / "results.json").read_text())["runs"]
    for key in ("cil_accuracy", "task_prediction_accuracy", "til_accuracy", "cil_matrix"):
        assert key in hat_run
    assert [len(row) for row in hat_run["cil_matrix"]] == [1, 2, 3, 4, 5]
    # HAT with task prediction keeps most of its task-incremental accuracy without the task id
    assert hat_run["til_accuracy"] == pytest.approx(100 * hat_run["average_accuracy"])
    assert hat_run["task_prediction_accuracy"] > 85.0
    assert hat_run["cil_accuracy"] > 85.0 and hat_run["cil_accuracy"] <= hat_run["til_accuracy"] + 1e-9
    assert hat_run["bwt"] == 0.0
    # the one shared head over all classes forgets every earlier task
    assert finetune["task_prediction_accuracy"] is None and finetune["til_accuracy"] is None
    assert finetune["cil_accuracy"] < 40.0
    assert finetune["args"]["method"] == "finetune" and finetune["args"]["scenario"] == "class-incremental"


def test_class_incremental_run_resumes_to_the_same_results(tmp_path, capsys):
    whole = run(build_parser().parse_args([*QUICK, "--scenario", "class-incremental"]))
    out = tmp_path / "run"
    main([*QUICK, "--scenario", "class-incremental", "--checkpoint-every", "task", "--stop-after", "2",
          "--out", str(out)])
    main([*QUICK, "--scenario", "class-incremental", "--resume", str(out)])
    capsys.readouterr()
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["cil_matrix"] == whole["cil_matrix"]
    assert resumed["cil_accuracy"] == whole["cil_accuracy"]
    assert resumed["task_prediction_accuracy"] == whole["task_prediction_accuracy"]
    with pytest.raises(SystemExit):  # the scenario is part of the settings a resume must keep
        main([*QUICK, "--resume", str(out)])
