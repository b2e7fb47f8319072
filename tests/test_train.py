import json
from dataclasses import asdict

import pytest
import torch

from clipfast import autoselect, digits, modules, train


def test_short_training_learns_and_beats_chance(tmp_path):
    config = train.TrainConfig(epochs=5, out=str(tmp_path), threads=1)
    result = train.train(config, progress=False)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.5, (first, last)
    # Ten classes: chance is 10% top-1; a few epochs are far past it.
    assert result.zero_shot["top1"] > 0.6, result.zero_shot
    assert result.retrieval["text_to_image_R@10"] > 0.1
    for name in ("result.json", "loss.png", "similarity.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_backends_give_the_same_loss_curve(tmp_path):
    # In float64 two seeded runs differ only by rounding, which training does
    # not amplify past 1e-9 in a few dozen steps; in float32 it would (1e-3).
    config = train.TrainConfig(epochs=1, batch_size=64, dtype="float64", threads=1)
    diffs = train.compare_backends(config, ["reference", "chunked"], tmp_path)
    assert diffs["reference"] == 0.0
    assert diffs["chunked"] < 1e-9, diffs
    assert (tmp_path / "backends.png").stat().st_size > 0


def test_train_cli_prints_zero_shot_line(tmp_path, capsys):
    train.main(["--epochs", "1", "--batch-size", "512", "--threads", "1", "--out", str(tmp_path),
                "--grad-cache-chunk", "200"])
    out = capsys.readouterr().out
    assert "zero-shot top-1: " in out
    # The machine and versions the figures came from are printed with them.
    assert "machine: " in out and "1 torch threads" in out and f"torch {torch.__version__}" in out


def test_train_rejects_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        train.train(train.TrainConfig(epochs=1, backend="magic", out=None), progress=False)


def _tiny(out, **changes):
    """Two epochs of three steps on a small model: a few seconds on 2 cores."""
    settings = dict(epochs=2, batch_size=512, width=16, embed_dim=16, out=str(out) if out else None,
                    threads=1)
    return train.TrainConfig(**{**settings, **changes})


class _Interrupt(modules.ClipLoss):
    """The loss, raising KeyboardInterrupt (Ctrl-C) at its ``at``-th call."""

    at, calls = 0, 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == type(self).at:
            raise KeyboardInterrupt
        return super().forward(*args, **kwargs)


def test_a_run_split_in_two_equals_an_unsplit_run(tmp_path, monkeypatch):
    whole = train.train(_tiny(tmp_path / "whole"), progress=False)
    assert len(whole.losses) == 6

    # Interrupted in the second step of the second epoch: the checkpoint holds epoch 1.
    monkeypatch.setattr(modules, "ClipLoss", type("Interrupt", (_Interrupt,), {"at": 5}))
    with pytest.raises(KeyboardInterrupt):
        train.train(_tiny(tmp_path / "split"), progress=False)
    checkpoint = train.load_checkpoint(tmp_path / "split" / train.CHECKPOINT_NAME)
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 3 and len(checkpoint["losses"]) == 3
    assert {"model", "optimizer", "scheduler", "rng"} <= checkpoint.keys()
    assert {"torch", "data", "numpy", "python"} <= checkpoint["rng"].keys()
    assert not (tmp_path / "split" / "result.json").exists()

    monkeypatch.undo()
    resumed = train.train(_tiny(tmp_path / "split"), progress=False,
                          resume=str(tmp_path / "split" / train.CHECKPOINT_NAME))
    assert resumed.resumed_from_epoch == 1
    assert resumed.losses == whole.losses  # bit for bit, not approximately
    assert resumed.zero_shot == whole.zero_shot and resumed.retrieval == whole.retrieval
    final = {name: train.load_checkpoint(tmp_path / name / train.CHECKPOINT_NAME)
             for name in ("whole", "split")}
    assert final["split"]["epoch"] == final["whole"]["epoch"] == 2
    for key, value in final["whole"]["model"].items():
        assert torch.equal(value, final["split"]["model"][key]), key
    for a, b in zip(final["whole"]["optimizer"]["state"].values(),
                    final["split"]["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def _fake_checkpoint(path, config):
    """A well-formed checkpoint of ``config``'s run at step 0 (empty states):
    enough for the checks made before training."""
    train.save_checkpoint(path, {"config": asdict(config), "epoch": 0, "step": 0, "steps_per_epoch": 3,
                                 "order": None, "model": {}, "optimizer": {}, "scheduler": {},
                                 "rng": {}, "losses": [], "seconds": 0.0})


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / train.CHECKPOINT_NAME
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--resume", str(checkpoint), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --resume: no checkpoint file at" in capsys.readouterr().err
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        train.main(["--resume", str(checkpoint), "--out", str(tmp_path)])
    assert f"{checkpoint}: not a clipfast.train checkpoint" in capsys.readouterr().err
    _fake_checkpoint(checkpoint, _tiny(tmp_path))
    with pytest.raises(SystemExit):
        train.main(["--resume", str(checkpoint), "--out", str(tmp_path), "--epochs", "2",
                    "--batch-size", "64"])
    err = capsys.readouterr().err
    assert "argument --resume: " in err and "--batch-size was 512, now 64" in err
    with pytest.raises(train.ConfigError, match="batch_size was 512, now 64"):
        train.train(_tiny(tmp_path, batch_size=64), resume=str(checkpoint))


@pytest.mark.parametrize("args,option,message", [
    (["--batch-size", "0"], "--batch-size", "must be a positive integer, got 0"),
    (["--epochs", "0"], "--epochs", "must be a positive integer, got 0"),
    (["--lr", "-1"], "--lr", "must be a positive number"),
    (["--lr", "nan"], "--lr", "must be a positive number"),
    (["--grad-cache-chunk", "-2"], "--grad-cache-chunk", "must be an integer >= 0"),
    (["--threads", "-1"], "--threads", "must be an integer >= 0"),
    (["--device", "tpu"], "--device", "expected cpu, cuda or cuda:N"),
    (["--compare-backends", "chunked", "--resume", "x"], "--resume", "cannot be combined"),
    (["--resume", "x", "--overwrite"], "--overwrite", "cannot be combined with --resume"),
    (["--checkpoint-every", "-1"], "--checkpoint-every", "must be an integer >= 0"),
    (["--width", "0"], "--width", "must be a positive integer"),
    (["--compare-backends", "chunked"], "--compare-backends", "needs at least two backends"),
])
def test_bad_arguments_fail_before_training(tmp_path, capsys, monkeypatch, args, option, message):
    monkeypatch.setattr(digits, "load_digits_splits", lambda **kw: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_info:
        train.main([*args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err, err


def test_cuda_without_cuda_and_unwritable_out_fail_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(digits, "load_digits_splits", lambda **kw: pytest.fail("trained"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --device: 'cuda' requested but CUDA is not available" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    for args in (["--out", str(tmp_path / "file")],
                 ["--compare-backends", "reference,chunked", "--out", str(tmp_path / "file" / "x")]):
        with pytest.raises(SystemExit) as exit_info:
            train.main(args)
        assert exit_info.value.code == 2
        assert "argument --out: cannot create the folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--compare-backends", "reference,magic", "--out", str(tmp_path)])
    assert "argument --compare-backends: unknown backend 'magic'" in capsys.readouterr().err


def test_help_explains_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m clipfast.train")
    for phrase in ("--epochs EPOCHS passes over the training images (default: 15)",
                   "(default: 128)", "(default: train_out)", "(default: auto)", "--resume CHECKPOINT",
                   f"(default: {train.DEFAULT_THREADS})", "--checkpoint-every STEPS", "--overwrite"):
        assert phrase in text, phrase
    options = [a for a in train.build_parser()._actions if a.option_strings != ["-h", "--help"]]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]


def test_cli_says_where_outputs_went_and_what_auto_chose(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(autoselect, "_LOGGED", set())
    with caplog.at_level("INFO", logger="clipfast"):
        train.main(["--epochs", "1", "--batch-size", "512", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr()
    chosen = autoselect.explain("cpu", (torch.float32,), 512, 64).backend
    assert f"loss backend: auto (auto chose {chosen})" in out.out
    assert f"wrote {tmp_path / 'result.json'}" in out.out and str(tmp_path / "checkpoint.pt") in out.out
    assert any(f"backend='auto' chose {chosen!r}" in r.getMessage() for r in caplog.records)
    recorded = json.loads((tmp_path / "result.json").read_text())
    assert recorded["loss_backend"] == chosen
    # The command, machine, thread count and versions behind the figures.
    assert recorded["command"][:3] == ["python", "-m", "clipfast.train"] and "--epochs" in recorded["command"]
    env = recorded["environment"]
    assert env["torch"] == torch.__version__ and env["torch_threads"] == 1 and env["cpu"]
    assert env["deterministic_algorithms"] is True and env["numpy"] and env["scikit-learn"]
    # Progress off a terminal: whole lines, no carriage returns.
    assert "\r" not in out.err and "train: 100%" in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt", "loss.png", "result.json", "similarity.png"]  # no temporary files left


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(modules, "ClipLoss", type("Interrupt", (_Interrupt,), {"at": 4}))
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--epochs", "2", "--batch-size", "512", "--threads", "1", "--out", str(tmp_path)])
    assert exit_info.value.code == 130
    checkpoint = tmp_path / train.CHECKPOINT_NAME
    err = capsys.readouterr().err
    assert f"saved after step 3 in {checkpoint}: rerun the same command with --resume {checkpoint}" in err
    assert "Traceback" not in err
    assert train.load_checkpoint(checkpoint)["epoch"] == 1


def test_the_cli_lists_the_registry_backends():
    # --backend's choices are written out in train.py so that --help needs no
    # torch; they must stay the registry's.
    from clipfast.dispatch import BACKENDS

    assert train.BACKEND_NAMES == BACKENDS
