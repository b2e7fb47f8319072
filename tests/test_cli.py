"""The command-line tools' shared pieces: atomic files and log-friendly progress."""

import io

import pytest

from clipfast import _cli


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk gone"):
        with _cli.atomic_output(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk gone")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left
    _cli.atomic_write_text(path, "new")
    assert path.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_unwritable_folder_explains_why(tmp_path):
    assert _cli.unwritable_folder(tmp_path / "a" / "b") is None
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
    (tmp_path / "file").write_text("")
    assert "cannot create the folder" in _cli.unwritable_folder(tmp_path / "file")


def test_progress_off_a_terminal_prints_periodic_whole_lines():
    log = io.StringIO()  # not a terminal
    with _cli.progress(1000, "train", "step", file=log, interval=3600) as bar:
        for _ in range(1000):
            bar.set_postfix_str("loss=1.000")
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # The first step and the end; nothing in between within the interval.
    assert len(lines) == 2, lines
    assert lines[0].startswith("train:   0%") and "1/1000" in lines[0] and "loss=1.000" in lines[0]
    assert lines[1].startswith("train: 100%") and "1000/1000" in lines[1]

    log = io.StringIO()
    with _cli.progress(3, "bench", "pt", file=log, interval=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert len(log.getvalue().splitlines()) == 3


def test_progress_can_be_switched_off():
    with _cli.progress(3, "x", "it", enabled=False) as bar:
        assert bar is None
