"""Train the reference CLIP on scikit-learn's digits: ``python -m clipfast.train``.

Images are split into train and held-out sets; training captions come from
``TRAIN_TEMPLATES``; zero-shot classification of the held-out images uses
prompt-ensembled class embeddings from the never-seen ``HELD_OUT_TEMPLATES``.
The run ends by printing ``zero-shot top-1: X%``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import digits
from .evaluation import retrieval_metrics, zero_shot_classifier, zero_shot_metrics
from .api import BACKENDS
from .gradcache import cached_contrastive_backward
from .models import CaptionTokenizer, build_clip
from .modules import ClipLoss


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


@dataclass
class TrainResult:
    config: Dict
    losses: List[float] = field(default_factory=list)
    zero_shot: Dict[str, float] = field(default_factory=dict)
    retrieval: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def train(config: TrainConfig, progress: bool = True) -> TrainResult:
    from tqdm import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(config.dtype)
    if dtype is None:
        raise ValueError(f"dtype must be float32 or float64, got {config.dtype!r}")
    train_set, held_out = digits.load_digits_splits(seed=config.seed)
    train_set.images, held_out.images = train_set.images.to(dtype), held_out.images.to(dtype)
    tokenizer = CaptionTokenizer.train(digits.caption_corpus())
    model = build_clip(config.image_encoder, tokenizer, embed_dim=config.embed_dim,
                       width=config.width).to(device=device, dtype=dtype)
    steps_per_epoch = -(-len(train_set.labels) // config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15)
    if config.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {config.backend!r}")
    loss_fn = ClipLoss(backend=config.backend)
    generator = torch.Generator().manual_seed(config.seed)
    result = TrainResult(config=asdict(config))

    start = time.perf_counter()
    model.train()
    bar = tqdm(total=config.epochs * steps_per_epoch, desc="train", unit="step", disable=not progress)
    for _ in range(config.epochs):
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
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            bar.update(1)
    bar.close()
    result.seconds = time.perf_counter() - start

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


def _write_outputs(out: Path, result: TrainResult, image_features, classifier, labels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(asdict(result), indent=1))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(result.losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("CLIP loss")
    ax.set_title(f"training loss ({result.config['image_encoder']}, backend {result.config['backend']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

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
    fig.savefig(out / "similarity.png", dpi=110)
    plt.close(fig)


def compare_backends(config: TrainConfig, backends: List[str], out: Path) -> Dict[str, float]:
    """Train the same seeded run once per backend; plot the loss curves together.

    Returns the largest absolute difference of each backend's curve from the
    first one's.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(out / "backends.png", dpi=110)
    plt.close(fig)
    (out / "backends.json").write_text(json.dumps({"curves": curves, "max_abs_diff": diffs}))
    return diffs


def main(argv=None) -> TrainResult:
    parser = argparse.ArgumentParser(prog="python -m clipfast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--backend", default=defaults.backend, choices=BACKENDS,
                        help="loss backend (default auto)")
    parser.add_argument("--image-encoder", default=defaults.image_encoder, choices=["vit", "resnet"])
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "float64"])
    parser.add_argument("--grad-cache-chunk", type=int, default=0,
                        help="run the encoders in chunks of this many rows (gradient caching)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", default=defaults.out, help="folder for result.json and the plots")
    parser.add_argument("--compare-backends", default=None,
                        help="comma list: train once per backend and plot the loss curves together")
    args = parser.parse_args(argv)
    config = TrainConfig(device=args.device, backend=args.backend, image_encoder=args.image_encoder,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         dtype=args.dtype,
                         grad_cache_chunk=args.grad_cache_chunk, out=args.out, threads=args.threads)
    if args.compare_backends:
        diffs = compare_backends(config, args.compare_backends.split(","), Path(args.out))
        for backend, diff in diffs.items():
            print(f"{backend}: max |loss difference| from {args.compare_backends.split(',')[0]} = {diff:.3e}")
        return None
    result = train(config)
    print(json.dumps({"zero_shot": result.zero_shot, "retrieval": result.retrieval}, indent=1))
    print(f"trained {len(result.losses)} steps in {result.seconds:.1f} s")
    print(f"zero-shot top-1: {100 * result.zero_shot['top1']:.1f}%")
    return result


if __name__ == "__main__":
    main()
