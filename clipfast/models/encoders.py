"""Reference CLIP dual encoder for small images: a ViT or a ResNet for images,
a Transformer over BPE tokens for text, linear projections into a shared
space, and open_clip's learnable temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100)


class TinyViT(nn.Module):
    """Vision Transformer: square patches, a class token, pre-norm blocks."""

    def __init__(self, image_size: int = 8, patch_size: int = 2, channels: int = 1, width: int = 64,
                 layers: int = 2, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.patch = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        num_patches = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, num_patches + 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, width)."""
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.norm(self.blocks(x)[:, 0])


def _norm(channels: int) -> nn.Module:
    # GroupNorm, not BatchNorm: per-sample statistics keep encoder chunking
    # (clipfast.gradcache) exactly equal to the unchunked step.
    return nn.GroupNorm(min(8, channels), channels)


class _ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _norm(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class TinyResNet(nn.Module):
    """ResNet: a stem, residual stages that halve the resolution, global pooling
    (GroupNorm throughout)."""

    def __init__(self, channels: int = 1, widths=(32, 64), blocks_per_stage: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
                                  _norm(widths[0]), nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stages.append(_ResidualBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.stages = nn.Sequential(*stages)
        self.width = cin

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, width)."""
        return self.stages(self.stem(images)).mean(dim=(2, 3))


class TextTransformer(nn.Module):
    """Token + position embeddings, a causal pre-norm Transformer (as CLIP's), and
    the end-of-text token's state: what follows it cannot reach it."""

    def __init__(self, vocab_size: int, context_length: int, pad_id: int, eos_id: int,
                 width: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pad_id, self.eos_id = pad_id, eos_id
        self.width = width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 -> (B, width), read at each sequence's end-of-text token."""
        x = self.token(tokens) + self.pos[:, :tokens.shape[1]]
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device)
        x = self.norm(self.blocks(x, mask=causal, is_causal=True))
        eos = (tokens == self.eos_id).int().argmax(dim=1)
        return x[torch.arange(tokens.shape[0], device=tokens.device), eos]


class CLIP(nn.Module):
    """Dual encoder with projections into a shared space and a learnable scale.

    ``forward`` returns open_clip's dict (normalised features and the
    exponentiated scale), so ``ClipLoss()(**model(images, tokens))`` works.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int = 64):
        super().__init__()
        self.visual = image_encoder
        self.text = text_encoder
        self.image_projection = nn.Linear(image_encoder.width, embed_dim, bias=False)
        self.text_projection = nn.Linear(text_encoder.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.image_projection(self.visual(images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text_projection(self.text(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        return {
            "image_features": self.encode_image(images),
            "text_features": self.encode_text(tokens),
            "logit_scale": self.logit_scale.exp(),
        }

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """open_clip clamps the log-scale to [0, ln 100] after every optimiser step."""
        self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def build_clip(image_encoder: str, tokenizer, embed_dim: int = 64, width: int = 64,
               image_size: int = 8, dropout: float = 0.0) -> CLIP:
    """A CLIP for ``image_size`` grayscale images with a "vit" or "resnet" tower."""
    if image_encoder == "vit":
        visual = TinyViT(image_size=image_size, width=width, dropout=dropout)
    elif image_encoder == "resnet":
        visual = TinyResNet(widths=(width // 2, width))
    else:
        raise ValueError(f"image_encoder must be 'vit' or 'resnet', got {image_encoder!r}")
    text = TextTransformer(tokenizer.vocab_size, tokenizer.context_length, tokenizer.pad_id,
                           tokenizer.eos_id, width=width, dropout=dropout)
    return CLIP(visual, text, embed_dim)
