import pytest

from clipfast import train


def test_short_training_learns_and_beats_chance(tmp_path):
    config = train.TrainConfig(epochs=5, out=str(tmp_path))
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
    config = train.TrainConfig(epochs=1, batch_size=64, dtype="float64")
    diffs = train.compare_backends(config, ["reference", "chunked"], tmp_path)
    assert diffs["reference"] == 0.0
    assert diffs["chunked"] < 1e-9, diffs
    assert (tmp_path / "backends.png").stat().st_size > 0


def test_train_cli_prints_zero_shot_line(tmp_path, capsys):
    train.main(["--epochs", "1", "--out", str(tmp_path), "--grad-cache-chunk", "50"])
    assert "zero-shot top-1: " in capsys.readouterr().out


def test_train_rejects_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        train.train(train.TrainConfig(epochs=1, backend="magic", out=None), progress=False)
