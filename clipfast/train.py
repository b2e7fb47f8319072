"""Train the reference CLIP on scikit-learn's digits: ``python -m clipfast.train``.

Images are split into train and held-out sets; training captions come from
``TRAIN_TEMPLATES``; zero-shot classification of the held-out images uses
prompt-ensembled class embeddings from the never-seen ``HELD_OUT_TEMPLATES``.
The run ends by printing ``zero-shot top-1: X%``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import digits
from ._cli import atomic_output, atomic_write_text, show_info_logs, unwritable_folder
from ._cli import progress as progress_lines
from .dispatch import BACKENDS
from .evaluation import retrieval_metrics, zero_shot_classifier, zero_shot_metrics
from .gradcache import cached_contrastive_backward
from .models import CaptionTokenizer, build_clip
from .modules import ClipLoss

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_FORMAT = "clipfast.train checkpoint v1"
# Settings that may differ between a run and its resumption: where outputs
# go and how many CPU threads run (results are bit-identical only with the
# same threads and device, but continuing elsewhere is still useful).
_RESUME_MAY_CHANGE = ("out", "threads", "device")


class ConfigError(ValueError):
    """A setting that cannot work; ``name`` is the TrainConfig field (the
    command line's ``--name-with-dashes``)."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


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
    threads: int = 0  # torch CPU threads; 0 keeps torch's default

    def validate(self) -> None:
        """Raise ConfigError for the first setting that cannot work, before
        anything is trained (including an ``out`` folder that cannot be written)."""
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError("device", f"expected cpu, cuda or cuda:N, got {self.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ConfigError("device", f"expected cpu, cuda or cuda:N, got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", f"{self.device!r} requested but CUDA is not available here "
                                        f"(torch {torch.__version__}); use cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("device", f"{self.device!r} requested but there are "
                                        f"{torch.cuda.device_count()} CUDA devices")
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.image_encoder not in ("vit", "resnet"):
            raise ConfigError("image_encoder", f"must be vit or resnet, got {self.image_encoder!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError("dtype", f"must be float32 or float64, got {self.dtype!r}")
        for name in ("epochs", "batch_size", "embed_dim", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        for name in ("grad_cache_chunk", "threads", "seed"):
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
    resumed_from_epoch: int = 0


def load_checkpoint(path) -> dict:
    """A checkpoint written by ``train``; ValueError when ``path`` is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint file at {str(path)!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{str(path)!r} is not a readable checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a clipfast.train checkpoint")
    return checkpoint


def resume_mismatches(config: "TrainConfig", checkpoint: dict, style=lambda name: name) -> List[str]:
    """Settings of ``config`` that differ from the checkpoint's run (a
    resumption could not continue it), as "NAME was X, now Y" with each field
    name written by ``style``."""
    saved = checkpoint["config"]
    return [f"{style(f.name)} was {saved.get(f.name)!r}, now {getattr(config, f.name)!r}"
            for f in fields(TrainConfig)
            if f.name not in _RESUME_MAY_CHANGE and saved.get(f.name) != getattr(config, f.name)]


def _rng_states(generator: torch.Generator) -> dict:
    states = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def train(config: TrainConfig, progress: bool = True, resume: Optional[str] = None) -> TrainResult:
    """Train, evaluate and (with ``config.out``) write result.json, the plots
    and a checkpoint after every epoch.

    ``resume``: a checkpoint of an interrupted run with the same settings
    (``out``, ``threads`` and ``device`` may differ); training continues after
    its last epoch, and with the same device and threads the result equals an
    uninterrupted run's bit for bit.
    """
    config.validate()
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        mismatches = resume_mismatches(config, checkpoint)
        if mismatches:
            raise ConfigError("resume", f"{resume} was written by a run with other settings ("
                                        + "; ".join(mismatches) + "); resume with the original ones")
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    train_set, held_out = digits.load_digits_splits(seed=config.seed)
    train_set.images, held_out.images = train_set.images.to(dtype), held_out.images.to(dtype)
    tokenizer = CaptionTokenizer.train(digits.caption_corpus())
    model = build_clip(config.image_encoder, tokenizer, embed_dim=config.embed_dim,
                       width=config.width).to(device=device, dtype=dtype)
    steps_per_epoch = -(-len(train_set.labels) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15)
    # The encoders return L2-normalised features (as open_clip's do), so the
    # loss takes them as they are: open_clip's ClipLoss semantics.
    loss_fn = ClipLoss(backend=config.backend, normalize=False)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(config=asdict(config))
    result.loss_backend = config.backend
    if config.backend == "auto":
        from .autoselect import explain

        result.loss_backend = explain(device, (dtype,), min(config.batch_size, len(train_set.labels)),
                                      config.embed_dim).backend

    first_epoch = 0
    if checkpoint is not None:
        # Model, optimiser (AdamW moments), schedule position and every RNG
        # that training draws from: the next epoch starts exactly where the
        # interrupted run's would have.
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["scheduler"])
        _restore_rng_states(checkpoint["rng"], generator)
        result.losses = list(checkpoint["losses"])
        result.seconds = float(checkpoint["seconds"])
        first_epoch = result.resumed_from_epoch = int(checkpoint["epoch"])
    checkpoint = None  # its tensors are no longer needed

    model.train()
    done = first_epoch * steps_per_epoch
    with progress_lines(config.epochs * steps_per_epoch, "train", "step", enabled=progress) as bar:
        if bar is not None and done:
            bar.update(done)
        for epoch in range(first_epoch, config.epochs):
            start = time.perf_counter()
            order = torch.randperm(len(train_set.labels), generator=generator)
            for step in range(steps_per_epoch):
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
            result.seconds += time.perf_counter() - start
            if config.out:
                save_checkpoint(Path(config.out) / CHECKPOINT_NAME, config, epoch + 1, steps_per_epoch,
                                model, optimizer, schedule, generator, result)

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
    if config.out:
        _write_outputs(Path(config.out), result, image_features, classifier, held_out.labels)
    return result


def save_checkpoint(path: Path, config: TrainConfig, epoch: int, steps_per_epoch: int, model,
                    optimizer, schedule, generator: torch.Generator, result: TrainResult) -> None:
    """Everything needed to continue after ``epoch`` epochs, written to a
    temporary file and renamed over ``path``: a kill mid-write leaves the
    previous checkpoint intact."""
    state = {
        "format": _CHECKPOINT_FORMAT,
        "config": asdict(config),
        "epoch": epoch,
        "step": epoch * steps_per_epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "rng": _rng_states(generator),
        "losses": list(result.losses),
        "seconds": result.seconds,
    }
    with atomic_output(path) as tmp:
        torch.save(state, tmp)


def _write_outputs(out: Path, result: TrainResult, image_features, classifier, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def compare_backends(config: TrainConfig, backends: List[str], out: Path) -> Dict[str, float]:
    """Train the same seeded run once per backend; plot the loss curves together.

    Returns the largest absolute difference of each backend's curve from the
    first one's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for backend in backends:
        if backend not in BACKENDS:
            raise ConfigError("compare_backends", f"unknown backend {backend!r}; choose from "
                                                  f"{', '.join(BACKENDS)}")
    if len(backends) < 2:
        raise ConfigError("compare_backends", f"needs at least two backends, got {backends}")
    problem = unwritable_folder(out)
    if problem:
        raise ConfigError("out", problem)
    TrainConfig(**{**asdict(config), "out": None}).validate()
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every option's default."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clipfast.train", description=__doc__,
                                     formatter_class=_HelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    parser.add_argument("--backend", default=defaults.backend, choices=BACKENDS,
                        help="loss backend; auto picks from measurements (clipfast.autoselect)")
    parser.add_argument("--image-encoder", default=defaults.image_encoder, choices=["vit", "resnet"],
                        help="image tower (the ViT needs about 30 epochs on 8x8 digits)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training images")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size,
                        help="image-caption pairs per step (N of the loss)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (one-cycle schedule)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seeds the split, the initialisation, the batches and the captions")
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float64"],
                        help="model and feature dtype")
    parser.add_argument("--grad-cache-chunk", type=int, default=defaults.grad_cache_chunk,
                        help="run the encoders in chunks of this many rows (gradient caching); 0: off")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--out", default=defaults.out,
                        help=f"folder for result.json, loss.png, similarity.png and {CHECKPOINT_NAME} "
                             "(written after every epoch)")
    parser.add_argument("--resume", metavar="CHECKPOINT", default=None,
                        help="continue the interrupted run that wrote this checkpoint; give the same "
                             "other arguments (only --out, --threads and --device may change)")
    parser.add_argument("--compare-backends", metavar="B1,B2,...", default=None,
                        help="train once per backend and plot the loss curves together in --out")
    return parser


def main(argv=None) -> Optional[TrainResult]:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = TrainConfig(device=args.device, backend=args.backend, image_encoder=args.image_encoder,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         dtype=args.dtype, grad_cache_chunk=args.grad_cache_chunk, out=args.out,
                         threads=args.threads)

    def option(name: str) -> str:
        return "--" + name.replace("_", "-")

    # Everything that can be checked is checked before the first step, so
    # that a typo fails in a second, not after the training run.
    try:
        config.validate()
        if args.resume and args.compare_backends:
            raise ConfigError("resume", "cannot be combined with --compare-backends")
        if args.resume:
            mismatches = resume_mismatches(config, load_checkpoint(args.resume), style=option)
            if mismatches:
                raise ConfigError("resume", f"{args.resume} was written by a run with other settings ("
                                            + "; ".join(mismatches) + "); give the original ones")
    except ConfigError as err:
        parser.error(f"argument {option(err.name)}: {err.message}")
    except ValueError as err:  # load_checkpoint
        parser.error(f"argument --resume: {err}")
    show_info_logs()

    out = Path(args.out)
    try:
        if args.compare_backends:
            backends = [b.strip() for b in args.compare_backends.split(",") if b.strip()]
            try:
                diffs = compare_backends(config, backends, out)
            except ConfigError as err:
                parser.error(f"argument {option(err.name)}: {err.message}")
            for backend, diff in diffs.items():
                print(f"{backend}: max |loss difference| from {backends[0]} = {diff:.3e}")
            print(f"wrote {out / 'backends.png'} and {out / 'backends.json'}")
            return None
        result = train(config, resume=args.resume)
    except KeyboardInterrupt:
        checkpoint = out / CHECKPOINT_NAME
        if not args.compare_backends and checkpoint.exists():
            print(f"\ninterrupted; the last complete epoch is saved in {checkpoint}: rerun the same "
                  f"command with --resume {checkpoint} to continue", file=sys.stderr)
        raise SystemExit(130) from None
    print(json.dumps({"zero_shot": result.zero_shot, "retrieval": result.retrieval}, indent=1))
    resumed = f" (resumed after epoch {result.resumed_from_epoch})" if result.resumed_from_epoch else ""
    chosen = f" (auto chose {result.loss_backend})" if config.backend == "auto" else ""
    print(f"loss backend: {config.backend}{chosen}")
    print(f"trained {len(result.losses)} steps in {result.seconds:.1f} s{resumed}")
    print(f"zero-shot top-1: {100 * result.zero_shot['top1']:.1f}%")
    print(f"wrote {out / 'result.json'}, {out / 'loss.png'}, {out / 'similarity.png'} and the "
          f"checkpoint {out / CHECKPOINT_NAME}")
    return result


if __name__ == "__main__":
    main()
