"""python -m clipfast.train: checkpoints that prove their integrity, runs that
never overwrite each other, and results that repeat bit for bit.

One tiny uninterrupted run (two epochs of three steps, module fixture) is the
reference: its checkpoint is the file the corruption tests damage, and the
killed-and-resumed run and a second run of the same command must equal it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipfast import digits, train

REPO = Path(__file__).resolve().parent.parent
TINY = dict(epochs=2, batch_size=512, width=16, embed_dim=16, threads=1)  # 3 steps per epoch


def _args(out, *extra):
    """The command line of the tiny run."""
    return ["--epochs", "2", "--batch-size", "512", "--width", "16", "--embed-dim", "16",
            "--threads", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted tiny run: (result, its final checkpoint's path)."""
    out = tmp_path_factory.mktemp("reference")
    result = train.train(train.TrainConfig(**TINY, out=str(out)), progress=False)
    return result, out / train.CHECKPOINT_NAME


def _copy(path: Path, to: Path) -> Path:
    to.write_bytes(path.read_bytes())
    return to


def _one_line_error(capsys, argv) -> str:
    """Run the CLI, expecting exit status 2 and a single line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _rewrite_header(data: bytes, **changes) -> bytes:
    magic = train.CHECKPOINT_MAGIC
    end = data.index(b"\n", len(magic))
    header = json.loads(data[len(magic):end])
    header.update(changes)
    header = {k: v for k, v in header.items() if v is not None}
    return magic + json.dumps(header).encode() + data[end:]


def _with_payload(payload: bytes) -> bytes:
    """A checkpoint file around ``payload`` with a correct header and hash."""
    header = {"format": "clipfast.train checkpoint", "format_version": train.CHECKPOINT_FORMAT_VERSION,
              "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    return train.CHECKPOINT_MAGIC + json.dumps(header).encode() + b"\n" + payload


def test_flipped_bytes_are_a_hash_error_naming_the_file(reference, tmp_path, capsys):
    # The case: 64 bytes flipped in the middle used to load silently
    # (an AdamW moment off by 1.7e5) and training went on from corrupt state.
    path = _copy(reference[1], tmp_path / "flipped.pt")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    err = _one_line_error(capsys, _args(tmp_path / "out", "--resume", str(path)))
    assert "argument --resume" in err and str(path) in err and "hash mismatch" in err, err
    with pytest.raises(train.CheckpointError, match="hash"):
        train.load_checkpoint(path)


def test_a_truncated_checkpoint_is_refused(reference, tmp_path, capsys):
    path = tmp_path / "truncated.pt"
    path.write_bytes(reference[1].read_bytes()[:-1000])
    err = _one_line_error(capsys, _args(tmp_path / "out", "--resume", str(path)))
    assert str(path) in err and "truncated" in err, err
    # Cut inside the header line: still a clear refusal, not a parse traceback.
    path.write_bytes(reference[1].read_bytes()[:len(train.CHECKPOINT_MAGIC) + 5])
    with pytest.raises(train.CheckpointError, match="damaged or truncated"):
        train.load_checkpoint(path)


@pytest.mark.parametrize("version,message", [
    (99, "unknown format version 99"),
    ("2", "unknown format version '2'"),
    (None, "the header has no format_version"),
])
def test_a_missing_or_unknown_format_version_is_refused(reference, tmp_path, capsys, version, message):
    path = tmp_path / "version.pt"
    path.write_bytes(_rewrite_header(reference[1].read_bytes(), format_version=version))
    err = _one_line_error(capsys, _args(tmp_path / "out", "--resume", str(path)))
    assert str(path) in err and message in err, err


def test_a_checkpoint_of_the_old_format_is_refused(reference, tmp_path):
    # Format version 1 was a bare torch.save file: no header, no hash.
    path = tmp_path / "v1.pt"
    torch.save(train.load_checkpoint(reference[1]), path)
    with pytest.raises(train.CheckpointError, match="not a clipfast.train checkpoint"):
        train.load_checkpoint(path)


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_payload_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "the payload ran"
    # Bare pickle, and a pickle inside a correct header and hash (a hash
    # proves integrity, not safety: the payload is still loaded weights_only).
    bare = tmp_path / "bare.pt"
    bare.write_bytes(pickle.dumps(_Payload(marker)))
    wrapped = tmp_path / "wrapped.pt"
    with open(tmp_path / "object.pt", "wb") as f:
        torch.save({"x": _Payload(marker)}, f)
    wrapped.write_bytes(_with_payload((tmp_path / "object.pt").read_bytes()))
    with pytest.raises(train.CheckpointError, match="not a clipfast.train checkpoint"):
        train.load_checkpoint(bare)
    err = _one_line_error(capsys, _args(tmp_path / "out", "--resume", str(wrapped)))
    assert str(wrapped) in err and "weights_only=True refused it" in err, err
    assert not marker.exists()


def test_schema_mismatches_are_refused(reference, tmp_path, capsys):
    state = train.load_checkpoint(reference[1])
    # A payload without the optimiser state (hash intact).
    path = tmp_path / "missing.pt"
    path.write_bytes(train.encode_checkpoint({k: v for k, v in state.items() if k != "optimizer"}))
    err = _one_line_error(capsys, _args(tmp_path / "out", "--resume", str(path)))
    assert str(path) in err and "missing keys: optimizer" in err, err
    # A tensor of the wrong shape for these settings: found before any step.
    key = next(iter(state["model"]))
    state["model"][key] = torch.zeros(3, 3)
    path = tmp_path / "shape.pt"
    train.save_checkpoint(path, state)
    err = _one_line_error(capsys, _args(tmp_path / "out2", "--resume", str(path)))
    assert str(path) in err and f"wrong shape for {key}: saved (3, 3)" in err, err
    assert not (tmp_path / "out2" / train.CHECKPOINT_NAME).exists()


def test_checkpoints_are_written_atomically_with_a_hash(reference):
    data = reference[1].read_bytes()
    magic = train.CHECKPOINT_MAGIC
    end = data.index(b"\n", len(magic))
    header = json.loads(data[len(magic):end])
    payload = data[end + 1:]
    assert header["format_version"] == train.CHECKPOINT_FORMAT_VERSION
    assert header["payload_bytes"] == len(payload)
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    # No temporary file is left beside it.
    assert not [p.name for p in reference[1].parent.iterdir() if p.name.endswith(".tmp")]


# A training run that hangs right after writing the checkpoint of step
# KILL_AT, so that the test can SIGKILL it there: in the middle of the second
# epoch (steps 4-6), with that step's checkpoint on disk.
_CHILD = r"""
import sys, time
from clipfast import train
KILL_AT = 4
real = train.save_checkpoint
def save_then_hang(path, state):
    real(path, state)
    print("saved", state["step"], flush=True)
    if state["step"] == KILL_AT:
        time.sleep(600)
train.save_checkpoint = save_then_hang
train.main(sys.argv[1:])
"""


def test_a_run_killed_mid_epoch_resumes_bit_identically(reference, tmp_path, capsys):
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *_args(out, "--checkpoint-every", "1")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        saved = []
        for line in child.stdout:
            if line.startswith("saved "):
                saved.append(int(line.split()[1]))
                if saved[-1] == 4:
                    break
        assert saved == [1, 2, 3, 4], saved  # every step checkpointed, epoch end included
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    checkpoint = train.load_checkpoint(out / train.CHECKPOINT_NAME)
    assert checkpoint["step"] == 4 and checkpoint["epoch"] == 1 and checkpoint["order"] is not None
    assert not (out / "result.json").exists()

    resumed = train.main(_args(out, "--resume", str(out / train.CHECKPOINT_NAME)))
    assert "resumed after step 4" in capsys.readouterr().out
    whole = reference[0]
    assert resumed.losses == whole.losses  # bit for bit, the four steps before the kill included
    assert resumed.zero_shot == whole.zero_shot and resumed.retrieval == whole.retrieval
    _assert_same_state(train.load_checkpoint(out / train.CHECKPOINT_NAME),
                       train.load_checkpoint(reference[1]))


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == 6
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])


def test_the_same_command_twice_gives_the_same_bits_and_records_the_machine(reference, tmp_path):
    # The second run goes through --overwrite into a folder an earlier run
    # used: its files go, a file that is not a run's stays.
    out = tmp_path / "again"
    out.mkdir()
    (out / "result.json").write_text("an earlier run's")
    (out / ".checkpoint.pt.12345.tmp").write_text("a killed run's half-written file")
    (out / "notes.txt").write_text("mine")
    again = train.main(_args(out, "--overwrite"))
    whole = reference[0]
    assert again.losses == whole.losses
    assert again.zero_shot == whole.zero_shot and again.retrieval == whole.retrieval
    _assert_same_state(train.load_checkpoint(out / train.CHECKPOINT_NAME),
                       train.load_checkpoint(reference[1]))
    assert (out / "notes.txt").read_text() == "mine" and not (out / ".checkpoint.pt.12345.tmp").exists()
    recorded = json.loads((out / "result.json").read_text())
    assert recorded["zero_shot"] == whole.zero_shot
    assert recorded["environment"]["torch_threads"] == 1
    assert recorded["environment"]["deterministic_algorithms"] is True
    assert {"cpu", "cores", "python", "torch", "numpy", "scikit-learn", "tokenizers"} <= \
        recorded["environment"].keys()
    # The process's torch settings are restored after the run.
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_second_run_into_a_used_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(digits, "load_digits_splits", lambda **kw: pytest.fail("trained"))
    (tmp_path / "result.json").write_text("seed 0's")
    err = _one_line_error(capsys, _args(tmp_path, "--seed", "1"))
    assert f"argument --out: the folder {str(tmp_path)!r} is not empty (result.json)" in err
    assert f"--resume {tmp_path / train.CHECKPOINT_NAME}" in err and "--overwrite" in err
    assert (tmp_path / "result.json").read_text() == "seed 0's"
    with pytest.raises(train.ConfigError, match="out: the folder .* is not empty"):
        train.train(train.TrainConfig(**TINY, out=str(tmp_path)), progress=False)
    err = _one_line_error(capsys, ["--compare-backends", "reference,chunked", "--out", str(tmp_path)])
    assert "argument --out: the folder" in err


def test_resuming_a_config_whose_checkpoint_lacks_rng_states_is_refused(reference, tmp_path):
    # A schema check beyond the keys: the states a bit-identical resume needs.
    state = train.load_checkpoint(reference[1])
    del state["rng"]["numpy"]
    path = tmp_path / "rng.pt"
    train.save_checkpoint(path, state)
    with pytest.raises(train.CheckpointError, match="RNG states missing"):
        train.train(train.TrainConfig(**TINY, out=str(tmp_path / "out")), progress=False,
                    resume=str(path))
    assert not (tmp_path / "out" / train.CHECKPOINT_NAME).exists()  # refused before any step
