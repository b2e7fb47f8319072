"""Train the reference CLIP on scikit-learn's digits: ``python -m clipfast.train``.

Images are split into train and held-out sets; training captions come from
``TRAIN_TEMPLATES``; zero-shot classification of the held-out images uses
prompt-ensembled class embeddings from the never-seen ``HELD_OUT_TEMPLATES``.
The run ends by printing ``zero-shot top-1: X%``.

Outputs go to --out, which must be a new or empty folder: --resume continues
the run that wrote a checkpoint there, --overwrite replaces that run's files.
A checkpoint is written after every epoch (and every --checkpoint-every
steps); it records its format version and the sha256 hash of its contents,
and a damaged, truncated or foreign file is refused, never trained from.

Reproducibility: the same settings on the same machine (CPU model), with the
same versions (result.json records machine and versions) and the same
--threads, give the same metrics and parameters bit for bit, and so does a
run stopped and continued with --resume. Another CPU or thread count rounds
differently, so its metrics differ slightly.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

# Only the standard library at module level: torch, the models and matplotlib
# are imported where they are used, after the arguments are checked, so that
# --help and argument errors answer at once.
from ._cli import (atomic_output, atomic_write_bytes, atomic_write_text, environment, fail,
                   occupied_folder, show_info_logs, temporary_files, unwritable_folder)
from ._cli import progress as progress_lines

PROG = "python -m clipfast.train"
CHECKPOINT_NAME = "checkpoint.pt"
# Everything a run writes in --out (--overwrite removes these, nothing else).
OUTPUT_NAMES = ("result.json", "loss.png", "similarity.png", CHECKPOINT_NAME, "backends.png",
                "backends.json")
# A checkpoint file: this line, a JSON header line, then the torch.save payload
# whose length and sha256 the header records.
CHECKPOINT_MAGIC = b"CLIPFAST-TRAIN-CHECKPOINT\n"
CHECKPOINT_FORMAT_VERSION = 2
_CHECKPOINT_KEYS = ("config", "epoch", "step", "steps_per_epoch", "order", "model", "optimizer",
                    "scheduler", "rng", "losses", "seconds")
# clipfast.dispatch.BACKENDS, written out so that --help needs no torch
# (tests/test_train.py checks the two agree).
BACKEND_NAMES = ("auto", "reference", "chunked", "triton", "hybrid", "cpu", "cuda")
# torch CPU threads unless --threads says otherwise: a fixed count, not the
# machine's core count, so that runs on machines with other core counts use
# the same one (results are bit-identical only with the same thread count).
DEFAULT_THREADS = 2
# Settings that may differ between a run and its resumption: where outputs
# go, how many CPU threads run and how often checkpoints are written (results
# are bit-identical only with the same threads and device, but continuing
# elsewhere is still useful).
_RESUME_MAY_CHANGE = ("out", "threads", "device", "checkpoint_every")
_DEVICE_RE = re.compile(r"cpu(:0)?|cuda(:\d+)?")


class ConfigError(ValueError):
    """A setting that cannot work; ``name`` is the TrainConfig field (the
    command line's ``--name-with-dashes``)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from: the message names the
    file and what is wrong with it."""

    def __init__(self, path, problem: str):
        super().__init__(problem if str(path) in problem else f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass
class TrainConfig:
    device: str = "cpu"
    backend: str = "auto"
    image_encoder: str = "resnet"  # the ViT learns slower on 8x8 images: give it ~30 epochs
    epochs: int = 15
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    embed_dim: int = 64
    width: int = 64
    seed: int = 0
    dtype: str = "float32"  # float64 for backend comparisons free of rounding drift
    grad_cache_chunk: int = 0  # > 0: run the encoders in chunks of this many rows
    out: Optional[str] = "train_out"
    threads: int = DEFAULT_THREADS  # torch CPU threads; 0 keeps torch's default (the core count)
    checkpoint_every: int = 0  # > 0: also checkpoint every this many steps, not only per epoch

    def validate(self, devices: bool = True) -> None:
        """Raise ConfigError for the first setting that cannot work, before
        anything is trained (including an ``out`` folder that cannot be
        written). ``devices=False`` leaves out what needs torch (whether the
        device exists here)."""
        if not isinstance(self.device, str) or not _DEVICE_RE.fullmatch(self.device):
            raise ConfigError("device", f"expected cpu, cuda or cuda:N, got {self.device!r}")
        if self.backend not in BACKEND_NAMES:
            raise ConfigError("backend", f"must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}")
        if self.image_encoder not in ("vit", "resnet"):
            raise ConfigError("image_encoder", f"must be vit or resnet, got {self.image_encoder!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError("dtype", f"must be float32 or float64, got {self.dtype!r}")
        for name in ("epochs", "batch_size", "embed_dim", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        for name in ("grad_cache_chunk", "threads", "seed", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(name, f"must be an integer >= 0, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError("lr", f"must be a positive number, got {self.lr!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError("weight_decay", f"must be a number >= 0, got {self.weight_decay!r}")
        if self.out:
            problem = unwritable_folder(Path(self.out))
            if problem:
                raise ConfigError("out", problem)
        if devices:
            self._check_device()

    def _check_device(self) -> None:
        import torch

        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{self.device!r} requested but CUDA is not available here "
                                        f"(torch {torch.__version__}); use cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{self.device!r} requested but there are "
                                        f"{torch.cuda.device_count()} CUDA devices")


@dataclass
class TrainResult:
    config: Dict
    losses: List[float] = field(default_factory=list)
    zero_shot: Dict[str, float] = field(default_factory=dict)
    retrieval: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    # The backend that computed the loss: config.backend, or what "auto" chose
    # for a full batch.
    loss_backend: str = ""
    resumed_from_epoch: int = 0  # complete epochs in the checkpoint resumed from
    resumed_from_step: int = 0
    # The machine, thread count and versions the result was computed with
    # (clipfast._cli.environment), and the command line when run as one.
    environment: Dict[str, object] = field(default_factory=dict)
    command: Optional[List[str]] = None


# -------------------------------- checkpoints ------------------------------ #


def encode_checkpoint(state: dict) -> bytes:
    """The bytes of a checkpoint file holding ``state``: the magic line, a
    JSON header (format version, payload length and sha256), the payload."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    header = {"format": "clipfast.train checkpoint", "format_version": CHECKPOINT_FORMAT_VERSION,
              "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    return CHECKPOINT_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def load_checkpoint(path) -> dict:
    """The state a checkpoint file written by ``train`` holds.

    Raises CheckpointError, naming the file and the problem, unless the file
    has the header of this format version, exactly the payload length it
    records, the payload's recorded sha256 hash, and a payload of plain
    tensors and containers (``torch.load(weights_only=True)``: a pickled
    object is refused, never run) with every key a checkpoint has.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, f"no checkpoint file at {str(path)!r}")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(path, f"cannot be read: {err.strerror or err}") from None
    if not data.startswith(CHECKPOINT_MAGIC):
        raise CheckpointError(
            path, "not a clipfast.train checkpoint: it does not start with the "
                  f"{CHECKPOINT_MAGIC.decode().strip()} header line (checkpoints of format version 1, "
                  "written before checkpoints carried a hash, cannot be resumed)")
    end = data.find(b"\n", len(CHECKPOINT_MAGIC))
    try:
        header = json.loads(data[len(CHECKPOINT_MAGIC):end].decode()) if end >= 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(path, "damaged or truncated: its header line is not readable JSON")
    if "format_version" not in header:
        raise CheckpointError(path, "the header has no format_version: not a checkpoint this clipfast wrote")
    version = header["format_version"]
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(path, f"unknown format version {version!r}: this clipfast reads format "
                                    f"version {CHECKPOINT_FORMAT_VERSION}")
    size, digest = header.get("payload_bytes"), header.get("payload_sha256")
    if not isinstance(size, int) or not isinstance(digest, str):
        raise CheckpointError(path, "the header lacks payload_bytes or payload_sha256")
    payload = data[end + 1:]
    if len(payload) < size:
        raise CheckpointError(path, f"truncated: the header records {size} bytes of payload, the file "
                                    f"holds {len(payload)}")
    if len(payload) > size:
        raise CheckpointError(path, f"damaged: {len(payload) - size} bytes follow the {size}-byte payload")
    actual = hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CheckpointError(path, f"hash mismatch: the payload's sha256 is {actual[:16]}..., the header "
                                    f"records {digest[:16]}...: the file was damaged after it was written")
    import torch

    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every refusal gets the same message
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(path, "the payload is not plain tensors and containers (torch.load with "
                                    f"weights_only=True refused it: {reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(path, f"the payload is a {type(state).__name__}, not a checkpoint's dict")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(path, f"missing keys: {', '.join(missing)}")
    for key, kind in (("config", dict), ("model", dict), ("optimizer", dict), ("scheduler", dict),
                      ("rng", dict), ("losses", list), ("step", int), ("epoch", int),
                      ("steps_per_epoch", int)):
        if not isinstance(state[key], kind):
            raise CheckpointError(path, f"{key} is a {type(state[key]).__name__}, expected a {kind.__name__}")
    return state


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` as a checkpoint file: to a temporary file in the same
    folder, fsynced and renamed over ``path`` (a kill mid-write leaves the
    previous checkpoint intact)."""
    atomic_write_bytes(Path(path), encode_checkpoint(state))


def _check_state_fits(path, state: dict, model, optimizer, steps_per_epoch: int, n_train: int,
                      total_steps: int) -> None:
    """CheckpointError unless ``state`` holds tensors of the shapes the model
    and optimiser of these settings have, and a position inside this run."""
    import torch

    problems = []
    expected = model.state_dict()
    saved = state["model"]
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing:
        problems.append(f"model parameters missing: {', '.join(missing[:3])}"
                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    if unexpected:
        problems.append(f"unexpected model parameters: {', '.join(unexpected[:3])}"
                        + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""))
    for key, value in expected.items():
        if key in saved and (not isinstance(saved[key], torch.Tensor) or saved[key].shape != value.shape):
            shape = tuple(saved[key].shape) if isinstance(saved[key], torch.Tensor) else type(saved[key]).__name__
            problems.append(f"wrong shape for {key}: saved {shape}, the model has {tuple(value.shape)}")
    opt_state = state["optimizer"].get("state")
    groups = state["optimizer"].get("param_groups")
    params = list(model.parameters())
    if not isinstance(opt_state, dict) or not isinstance(groups, list):
        problems.append("the optimizer state lacks 'state' or 'param_groups'")
    else:
        indices = [i for g in groups if isinstance(g, dict) for i in g.get("params", [])]
        if len(indices) != len(params):
            problems.append(f"the optimizer state is for {len(indices)} parameters, the model has {len(params)}")
        else:
            for index, param in zip(indices, params):
                for name, value in (opt_state.get(index) or {}).items():
                    if name in ("exp_avg", "exp_avg_sq") and (
                            not isinstance(value, torch.Tensor) or value.shape != param.shape):
                        problems.append(f"wrong shape for the optimizer's {name} of parameter {index}")
    if state["steps_per_epoch"] != steps_per_epoch:
        problems.append(f"{state['steps_per_epoch']} steps per epoch, these settings make {steps_per_epoch}")
    if not 0 <= state["step"] <= total_steps or state["epoch"] != state["step"] // steps_per_epoch:
        problems.append(f"step {state['step']} (epoch {state['epoch']}) is not a position in a run of "
                        f"{total_steps} steps")
    order = state["order"]
    if state["step"] % steps_per_epoch and not (
            isinstance(order, torch.Tensor) and order.shape == (n_train,)):
        problems.append(f"a checkpoint within an epoch needs that epoch's order of {n_train} images")
    if not {"torch", "data", "numpy", "python"} <= state["rng"].keys():
        problems.append("RNG states missing (torch, data, numpy and python are needed)")
    if len(state["losses"]) != state["step"]:
        problems.append(f"{len(state['losses'])} recorded losses for {state['step']} steps")
    if problems:
        raise CheckpointError(path, "does not fit the model and run of these settings: "
                                    + "; ".join(problems[:4]))


def resume_mismatches(config: "TrainConfig", checkpoint: dict, style=lambda name: name) -> List[str]:
    """Settings of ``config`` that differ from the checkpoint's run (a
    resumption could not continue it), as "NAME was X, now Y" with each field
    name written by ``style``."""
    saved = checkpoint["config"]
    return [f"{style(f.name)} was {saved.get(f.name)!r}, now {getattr(config, f.name)!r}"
            for f in fields(TrainConfig)
            if f.name not in _RESUME_MAY_CHANGE and saved.get(f.name) != getattr(config, f.name)]


def _rng_states(generator) -> dict:
    """Every random state training draws from or a library might: torch's
    global (initialisation, dropout), the data generator (batch order,
    captions), numpy's and Python's global ones, CUDA's."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(), "data": generator.get_state(),
              "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
              "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                         "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict, generator) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    generator.set_state(states["data"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------- output folder ----------------------------- #


def out_folder_problem(out, resume: Optional[str], overwrite: bool) -> Optional[str]:
    """Why a run may not write into ``out``: it holds another run's files and
    neither ``resume`` nor ``overwrite`` was given (None when it may)."""
    if resume or overwrite or not out:
        return None
    return occupied_folder(Path(out), f"give --resume {Path(out) / CHECKPOINT_NAME} to continue that run")


def _remove_outputs(out: Path) -> None:
    """--overwrite: remove the files a run writes (and temporary files a
    killed run left), so that no file of the replaced run stays beside the
    new one's; anything else in the folder is left alone."""
    for path in [out / name for name in OUTPUT_NAMES] + temporary_files(out, OUTPUT_NAMES):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def reproducible(threads: int, device):
    """Fixed torch CPU threads (``threads``; 0 keeps torch's) and, on the CPU,
    ``torch.use_deterministic_algorithms(True)``; both restored afterwards."""
    import torch

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


# ---------------------------------- training -------------------------------- #


def train(config: TrainConfig, progress: bool = True, resume: Optional[str] = None,
          overwrite: bool = False, command: Optional[Sequence[str]] = None) -> TrainResult:
    """Train, evaluate and (with ``config.out``) write result.json, the plots
    and a checkpoint after every epoch (and every ``config.checkpoint_every``
    steps).

    ``config.out`` must be empty or new unless ``resume`` or ``overwrite``
    (which first removes the files an earlier run wrote there) is given.
    ``resume``: a checkpoint of an interrupted run with the same settings
    (``out``, ``threads``, ``device`` and ``checkpoint_every`` may differ);
    training continues after its last step, and with the same machine,
    versions and threads the result equals an uninterrupted run's bit for bit.
    ``command``: recorded in result.json (the command line of a CLI run).
    """
    import numpy as np
    import torch

    config.validate()
    if resume and overwrite:
        raise ConfigError("overwrite", "cannot be combined with resume")
    problem = out_folder_problem(config.out, resume, overwrite)
    if problem:
        raise ConfigError("out", problem)
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        mismatches = resume_mismatches(config, checkpoint)
        if mismatches:
            raise ConfigError("resume", f"{resume} was written by a run with other settings ("
                                        + "; ".join(mismatches) + "); resume with the original ones")
    if config.out and overwrite:
        _remove_outputs(Path(config.out))
    device = torch.device(config.device)
    with reproducible(config.threads, device):
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        result, plot_data = _train(config, device, progress, resume, checkpoint)
        result.command = list(command) if command is not None else None
        result.environment = environment(("torch", "numpy", "scikit-learn", "tokenizers"))
        result.environment["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
        if config.out:
            _write_outputs(Path(config.out), result, *plot_data)
    return result


def _train(config: TrainConfig, device, progress: bool, resume: Optional[str],
           checkpoint: Optional[dict]):
    """The run itself: (its result, the held-out features, classifier and
    labels that the plots show)."""
    import torch

    from . import digits
    from .evaluation import retrieval_metrics, zero_shot_classifier, zero_shot_metrics
    from .gradcache import cached_contrastive_backward
    from .models import CaptionTokenizer, build_clip
    from .modules import ClipLoss

    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    train_set, held_out = digits.load_digits_splits(seed=config.seed)
    train_set.images, held_out.images = train_set.images.to(dtype), held_out.images.to(dtype)
    tokenizer = CaptionTokenizer.train(digits.caption_corpus())
    model = build_clip(config.image_encoder, tokenizer, embed_dim=config.embed_dim,
                       width=config.width).to(device=device, dtype=dtype)
    n_train = len(train_set.labels)
    steps_per_epoch = -(-n_train // config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=0.15)
    # The encoders return L2-normalised features (as open_clip's do), so the
    # loss takes them as they are: open_clip's ClipLoss semantics.
    loss_fn = ClipLoss(backend=config.backend, normalize=False)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(config=asdict(config))
    result.loss_backend = config.backend
    if config.backend == "auto":
        from .autoselect import explain

        result.loss_backend = explain(device, (dtype,), min(config.batch_size, n_train),
                                      config.embed_dim).backend

    start_step, saved_order = 0, None
    if checkpoint is not None:
        # Model, optimiser (AdamW moments), schedule position, every RNG that
        # training draws from and, within an epoch, that epoch's batch order:
        # the next step is exactly the one the interrupted run would have taken.
        _check_state_fits(resume, checkpoint, model, optimizer, steps_per_epoch, n_train, total_steps)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        _restore_rng_states(checkpoint["rng"], generator)
        result.losses = list(checkpoint["losses"])
        result.seconds = float(checkpoint["seconds"])
        start_step = result.resumed_from_step = int(checkpoint["step"])
        result.resumed_from_epoch = start_step // steps_per_epoch
        saved_order = checkpoint["order"]
    checkpoint = None  # its tensors are no longer needed
    path = Path(config.out) / CHECKPOINT_NAME if config.out else None

    def save(done: int, order, seconds: float) -> None:
        save_checkpoint(path, {
            "config": asdict(config), "epoch": done // steps_per_epoch, "step": done,
            "steps_per_epoch": steps_per_epoch, "order": order,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(), "rng": _rng_states(generator),
            "losses": list(result.losses), "seconds": seconds})

    model.train()
    with progress_lines(total_steps, "train", "step", enabled=progress) as bar:
        if bar is not None and start_step:
            bar.update(start_step)
        for epoch in range(start_step // steps_per_epoch, config.epochs):
            start = time.perf_counter()
            if saved_order is not None and epoch == start_step // steps_per_epoch:
                order, first = saved_order, start_step % steps_per_epoch
            else:
                order, first = torch.randperm(n_train, generator=generator), 0
            for step in range(first, steps_per_epoch):
                idx = order[step * config.batch_size:(step + 1) * config.batch_size]
                images = train_set.images[idx].to(device)
                tokens = tokenizer(digits.captions(train_set.labels[idx], digits.TRAIN_TEMPLATES,
                                                   generator)).to(device)
                optimizer.zero_grad(set_to_none=True)
                if config.grad_cache_chunk > 0:
                    loss = cached_contrastive_backward(
                        model.encode_image, model.encode_text, images, tokens, loss_fn,
                        model.logit_scale.exp(), config.grad_cache_chunk)
                else:
                    loss = loss_fn(**model(images, tokens))
                    loss.backward()
                optimizer.step()
                schedule.step()
                model.clamp_logit_scale()
                result.losses.append(loss.item())
                if bar is not None:
                    bar.set_postfix_str(f"loss={loss.item():.3f}, scale={model.logit_scale.exp().item():.1f}")
                    bar.update(1)
                done = epoch * steps_per_epoch + step + 1
                if path and config.checkpoint_every and done % config.checkpoint_every == 0 \
                        and step + 1 < steps_per_epoch:
                    save(done, order, result.seconds + time.perf_counter() - start)
            result.seconds += time.perf_counter() - start
            if path:
                save((epoch + 1) * steps_per_epoch, None, result.seconds)

    model.eval()
    with torch.no_grad():
        image_features = model.encode_image(held_out.images.to(device)).float().cpu()
        classifier = zero_shot_classifier(
            lambda texts: model.encode_text(tokenizer(texts).to(device)).float().cpu(),
            digits.CLASS_NAMES, digits.HELD_OUT_TEMPLATES)
        result.zero_shot = zero_shot_metrics(image_features, classifier, held_out.labels)
        # Retrieval: each held-out image with one held-out-template caption.
        caption_texts = digits.captions(held_out.labels, digits.HELD_OUT_TEMPLATES,
                                        torch.Generator().manual_seed(config.seed + 1))
        text_features = model.encode_text(tokenizer(caption_texts).to(device)).float().cpu()
        result.retrieval = retrieval_metrics(image_features, text_features)
    return result, (image_features, classifier, held_out.labels)


def _write_outputs(out: Path, result: TrainResult, image_features, classifier, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from . import digits

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "result.json", json.dumps(asdict(result), indent=1))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result.losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("CLIP loss")
    ax.set_title(f"training loss ({result.config['image_encoder']}, backend {result.config['backend']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, out / "loss.png")

    # Three held-out images per class against the ten class prompts.
    picks = torch.cat([torch.nonzero(labels == c).flatten()[:3] for c in range(10)])
    sims = (image_features[picks] @ classifier.t()).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 6.5))
    im = ax.imshow(sims, cmap="viridis", aspect="auto")
    ax.set_xticks(range(10), digits.CLASS_NAMES, rotation=45)
    ax.set_yticks(range(len(picks)), [digits.CLASS_NAMES[int(labels[i])] for i in picks], fontsize=7)
    ax.set_xlabel("class prompt (held-out templates, ensembled)")
    ax.set_ylabel("held-out image (true class)")
    ax.set_title("cosine similarity")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save_figure(fig, out / "similarity.png")


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def compare_backends(config: TrainConfig, backends: List[str], out: Path,
                     overwrite: bool = False) -> Dict[str, float]:
    """Train the same seeded run once per backend; plot the loss curves together.

    ``out`` must be empty or new unless ``overwrite``. Returns the largest
    absolute difference of each backend's curve from the first one's.
    """
    for backend in backends:
        if backend not in BACKEND_NAMES:
            raise ConfigError("compare_backends", f"unknown backend {backend!r}; choose from "
                                                  f"{', '.join(BACKEND_NAMES)}")
    if len(backends) < 2:
        raise ConfigError("compare_backends", f"needs at least two backends, got {backends}")
    out = Path(out)
    problem = unwritable_folder(out) or out_folder_problem(out, None, overwrite)
    if problem:
        raise ConfigError("out", problem)
    TrainConfig(**{**asdict(config), "out": None}).validate()
    if overwrite:
        _remove_outputs(out)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    curves = {}
    for backend in backends:
        run = TrainConfig(**{**asdict(config), "backend": backend, "out": None})
        curves[backend] = train(run).losses
    # float64: the curves of a float64 run differ far below float32's resolution.
    base = torch.tensor(curves[backends[0]], dtype=torch.float64)
    diffs = {b: (torch.tensor(c, dtype=torch.float64) - base).abs().max().item()
             for b, c in curves.items()}
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (backend, curve), style in zip(curves.items(), ["-", "--", ":", "-."]):
        ax.plot(curve, style, lw=1.2, label=f"{backend} (max |diff| {diffs[backend]:.1e})")
    ax.set_xlabel("step")
    ax.set_ylabel("CLIP loss")
    ax.set_title("same seeded run, different loss backends")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, out / "backends.png")
    atomic_write_text(out / "backends.json", json.dumps({"curves": curves, "max_abs_diff": diffs}))
    return diffs


# ------------------------------------ CLI ----------------------------------- #


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=_HelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--backend", default=defaults.backend, choices=BACKEND_NAMES,
                        help="loss backend; auto picks from measurements (clipfast.autoselect)")
    parser.add_argument("--image-encoder", default=defaults.image_encoder, choices=["vit", "resnet"],
                        help="image tower (the ViT needs about 30 epochs on 8x8 digits)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training images")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="image-caption pairs per step (N of the loss)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--width", type=int, default=defaults.width, help="width of both towers")
    parser.add_argument("--embed-dim", type=int, default=defaults.embed_dim,
                        help="dimension of the shared embedding space (d of the loss)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seeds the split, the initialisation, the batches and the captions")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float64"],
                        help="model and feature dtype")
    parser.add_argument("--grad-cache-chunk", type=int, default=defaults.grad_cache_chunk,
                        help="run the encoders in chunks of this many rows (gradient caching); 0: off")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch CPU threads, fixed so that results do not depend on the machine's "
                             "core count (bit-identical results need the same count); 0: torch's "
                             "default, the number of cores")
    parser.add_argument("--out", default=defaults.out,
                        help=f"folder for result.json, loss.png, similarity.png and {CHECKPOINT_NAME}; "
                             "must be new or empty unless --resume or --overwrite is given")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, metavar="STEPS",
                        help=f"also write {CHECKPOINT_NAME} every this many steps within an epoch "
                             "(it is always written after every epoch); 0: only after epochs")
    parser.add_argument("--resume", metavar="CHECKPOINT", default=None,
                        help="continue the interrupted run that wrote this checkpoint; give the same "
                             "other arguments (only --out, --threads, --device and --checkpoint-every "
                             "may change)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run in a non-empty --out (its result, plots and checkpoint "
                             "are removed first)")
    parser.add_argument("--compare-backends", metavar="B1,B2,...", default=None,
                        help="train once per backend and plot the loss curves together in --out")
    return parser


def main(argv=None) -> Optional[TrainResult]:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = ["python", "-m", "clipfast.train", *(sys.argv[1:] if argv is None else argv)]
    config = TrainConfig(device=args.device, backend=args.backend, image_encoder=args.image_encoder,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         dtype=args.dtype, grad_cache_chunk=args.grad_cache_chunk, out=args.out,
                         threads=args.threads, width=args.width, embed_dim=args.embed_dim,
                         checkpoint_every=args.checkpoint_every)

    def option(name: str) -> str:
        return "--" + name.replace("_", "-")

    # Everything that can be checked is checked before the first step, so
    # that a typo fails in a second, not after the training run; what needs
    # no torch (most of it) before torch is imported.
    backends = None
    try:
        config.validate(devices=False)
        if args.resume and args.compare_backends:
            raise ConfigError("resume", "cannot be combined with --compare-backends")
        if args.resume and args.overwrite:
            raise ConfigError("overwrite", "cannot be combined with --resume (which continues the run "
                                           "in --out rather than replacing it)")
        if args.compare_backends:
            backends = [b.strip() for b in args.compare_backends.split(",") if b.strip()]
            unknown = [b for b in backends if b not in BACKEND_NAMES]
            if unknown:
                raise ConfigError("compare_backends", f"unknown backend {unknown[0]!r}; choose from "
                                                      f"{', '.join(BACKEND_NAMES)}")
            if len(backends) < 2:
                raise ConfigError("compare_backends", f"needs at least two backends, got {backends}")
    except ConfigError as err:
        parser.error(f"argument {option(err.name)}: {err.message}")
    out = Path(args.out)
    problem = out_folder_problem(out, args.resume, args.overwrite)
    if problem:
        fail(PROG, f"argument --out: {problem}")
    try:
        config.validate()  # the device: needs torch
    except ConfigError as err:
        parser.error(f"argument {option(err.name)}: {err.message}")
    if args.resume:
        try:
            mismatches = resume_mismatches(config, load_checkpoint(args.resume), style=option)
        except CheckpointError as err:
            fail(PROG, f"argument --resume: {err}")
        if mismatches:
            fail(PROG, f"argument --resume: {args.resume} was written by a run with other settings ("
                       + "; ".join(mismatches) + "); give the original ones")
    show_info_logs()

    try:
        if backends:
            try:
                diffs = compare_backends(config, backends, out, overwrite=args.overwrite)
            except ConfigError as err:
                parser.error(f"argument {option(err.name)}: {err.message}")
            for backend, diff in diffs.items():
                print(f"{backend}: max |loss difference| from {backends[0]} = {diff:.3e}")
            print(f"wrote {out / 'backends.png'} and {out / 'backends.json'}")
            return None
        result = train(config, resume=args.resume, overwrite=args.overwrite, command=command)
    except CheckpointError as err:  # a checkpoint whose contents do not fit these settings
        fail(PROG, f"argument --resume: {err}")
    except KeyboardInterrupt:
        _interrupted(out / CHECKPOINT_NAME if not backends else None, args.resume)
    print(json.dumps({"zero_shot": result.zero_shot, "retrieval": result.retrieval}, indent=1))
    resumed = f" (resumed after step {result.resumed_from_step})" if result.resumed_from_step else ""
    chosen = f" (auto chose {result.loss_backend})" if config.backend == "auto" else ""
    env = result.environment
    print(f"loss backend: {config.backend}{chosen}")
    print(f"trained {len(result.losses)} steps in {result.seconds:.1f} s{resumed}")
    print(f"zero-shot top-1: {100 * result.zero_shot['top1']:.1f}%")
    print(f"machine: {env['cpu']} ({env['machine']}, {env['cores']} cores), {env['torch_threads']} torch "
          f"threads; python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, "
          f"scikit-learn {env['scikit-learn']}, tokenizers {env['tokenizers']}")
    print(f"wrote {out / 'result.json'}, {out / 'loss.png'}, {out / 'similarity.png'} and the "
          f"checkpoint {out / CHECKPOINT_NAME}")
    return result


def _interrupted(checkpoint: Optional[Path], resumed_from: Optional[str]) -> None:
    """Ctrl-C: one line saying what is saved and how to continue; exit 130."""
    candidates = [p for p in (checkpoint, Path(resumed_from) if resumed_from else None)
                  if p is not None and p.is_file()]
    if checkpoint is None:
        print("\ninterrupted: the backend comparison was not finished", file=sys.stderr)
    elif candidates:
        try:
            saved = f" after step {load_checkpoint(candidates[0])['step']}"
        except CheckpointError:
            saved = ""
        print(f"\ninterrupted; the run is saved{saved} in {candidates[0]}: rerun the same command with "
              f"--resume {candidates[0]} to continue", file=sys.stderr)
    else:
        print("\ninterrupted before the first checkpoint: nothing to resume", file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":
    main()
