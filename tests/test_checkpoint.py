"""hat-cl run --checkpoint-every task / --resume: a resumed run ends exactly like an uninterrupted one."""

from __future__ import annotations

import json

import pytest

from hat.app.cli import main

BASE = ["run", "--benchmark", "split-digits", "--tasks", "3", "--epochs", "2", "--optimizer", "adamw"]


def _results(folder) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, model):
    full, part = tmp_path / "full", tmp_path / "part"
    assert main([*BASE, "--model", model, "--checkpoint-every", "task", "--out", str(full)]) == 0
    assert main([*BASE, "--model", model, "--checkpoint-every", "task", "--out", str(part), "--stop-after", "1"]) == 0
    assert len(_results(part)["matrix"]) == 1
    assert json.loads((part / "checkpoint" / "meta.json").read_text())["tasks_done"] == 1
    assert main([*BASE, "--model", model, "--resume", str(part)]) == 0
    assert _results(part)["matrix"] == _results(full)["matrix"]  # exactly, float for float
    assert not (part / "checkpoint.new").exists() and not (part / "checkpoint.old").exists()


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    main([*BASE, "--checkpoint-every", "task", "--out", str(out), "--stop-after", "1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*BASE[:-2], "--optimizer", "sgd", "--epochs", "3", "--resume", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "epochs=2 (now 3)" in err and "optimizer='adamw' (now 'sgd')" in err


def test_corrupt_checkpoint_is_a_clear_error_and_nothing_is_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    main([*BASE, "--checkpoint-every", "task", "--out", str(out), "--stop-after", "1"])
    weights = out / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*BASE, "--resume", str(out)])
    assert exc.value.code == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv, message", [
    ([*BASE, "--checkpoint-every", "task"], "needs --out"),
    ([*BASE, "--resume", "{tmp}"], "no checkpoint there"),
])
def test_bad_checkpoint_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
