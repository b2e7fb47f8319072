"""scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the
package: nothing is downloaded) as an image-caption dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_TEMPLATES = [
    "a photo of the digit {}.",
    "a picture of a {}.",
    "the number {}.",
    "an image of the digit {}.",
    "a handwritten {}.",
    "a drawing of the number {}.",
    "a blurry photo of a {}.",
]
# Never seen in training: zero-shot prompts are built from these.
HELD_OUT_TEMPLATES = [
    "a low resolution scan of the digit {}.",
    "a small picture of the number {}.",
    "a sketch of a {}.",
]


@dataclass
class DigitsSplit:
    images: torch.Tensor  # (N, 1, 8, 8) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64


def load_digits_splits(seed: int = 0, held_out_fraction: float = 0.2):
    """(train, held_out) stratified splits of the digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=held_out_fraction, random_state=seed,
        stratify=labels.numpy())
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return (DigitsSplit(images[train_idx], labels[train_idx]),
            DigitsSplit(images[test_idx], labels[test_idx]))


def captions(labels: Sequence[int], templates: Sequence[str], generator: torch.Generator) -> List[str]:
    """One caption per label, each from a template drawn at random."""
    picks = torch.randint(len(templates), (len(labels),), generator=generator).tolist()
    return [templates[t].format(CLASS_NAMES[int(y)]) for t, y in zip(picks, labels)]


def caption_corpus() -> List[str]:
    """Every caption the templates can make: the tokenizer's training text."""
    return [t.format(c) for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES for c in CLASS_NAMES]
