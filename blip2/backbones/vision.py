"""The toy image encoder: a small ``Blip2VisionModel`` pretrained on toy-world images, then frozen.

Like a real image encoder it never sees text: it is pretrained by classifying the four attributes from
its pooled output. Its quality is measured the way representation quality usually is, by a *fresh*
linear probe on frozen features, evaluated on held-out images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel, get_cosine_schedule_with_warmup

from blip2.toyworld.world import ATTRIBUTES, Attributes, decode_image, encode_jpeg, render

# The image processor statistics of the public BLIP-2 checkpoints (OpenAI CLIP's), so toy and real
# encoders are fed the same way.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionPretrainConfig:
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    batch_size: int = 96
    steps: int = 400
    learning_rate: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    jpeg_quality: int = 92  # train on what the corpus stores: JPEG-decoded images
    probe_train_size: int = 3000
    probe_steps: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        for name in ("batch_size", "steps", "num_layers", "probe_train_size", "probe_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must be in [0, steps]")


def build_vision_config(config: VisionPretrainConfig) -> Blip2VisionConfig:
    # initializer_range: Blip2VisionConfig's default (1e-10) starts every weight near zero, which stalls
    # training from scratch for hundreds of steps (measured); 0.02 is the usual ViT value.
    return Blip2VisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        image_size=config.image_size, patch_size=config.patch_size, attention_dropout=0.0,
        initializer_range=0.02, layer_norm_eps=1e-6,
    )


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> normalised float pixel values (B, 3, H, W), as the processor makes."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def attribute_labels(attributes: list[Attributes]) -> dict[str, torch.Tensor]:
    """The class index of each attribute of each image: ``{name: (N,) int64}``."""
    return {name: torch.tensor([values.index(getattr(a, name)) for a in attributes])
            for name, values in ATTRIBUTES.items()}


def sample_images(attributes: list[Attributes], n: int, rng: np.random.Generator, image_size: int,
                  jpeg_quality: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """n random images from ``attributes``: uint8 (n, H, W, 3) and the class index of each attribute."""
    chosen = [attributes[i] for i in rng.integers(len(attributes), size=n)]
    images = np.stack([decode_image(encode_jpeg(render(a, rng, image_size), jpeg_quality)) for a in chosen])
    return images, attribute_labels(chosen)


class AttributeHeads(nn.Module):
    """One linear classifier per attribute over a feature vector: the pretraining heads and the probe."""

    def __init__(self, feature_size: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(feature_size, len(v)) for name, v in ATTRIBUTES.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}

    def loss(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self(features)
        return sum(nn.functional.cross_entropy(logits[n], labels[n]) for n in logits) / len(logits)

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
        logits = self(features)
        return {n: (logits[n].argmax(-1) == labels[n]).float().mean().item() for n in logits}


def pretrain_vision(config: VisionPretrainConfig, attributes: list[Attributes],
                    log: Callable[[str], None] = print) -> Blip2VisionModel:
    """Train a fresh ``Blip2VisionModel`` to classify attributes from its pooled output, on images drawn
    on the fly from ``attributes`` (so it never overfits a fixed set). Returns it frozen, in eval mode."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng([config.seed, 1])
    model = Blip2VisionModel(build_vision_config(config))
    heads = AttributeHeads(config.hidden_size)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embedding" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay + list(heads.parameters()), "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(0.9, 0.98),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        images, labels = sample_images(attributes, config.batch_size, rng, config.image_size, config.jpeg_quality)
        features = model(pixel_values(images)).pooler_output  # (B, hidden)
        loss = heads.loss(features, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            accuracy = heads.accuracy(features.detach(), labels)
            log(f"vision step {step + 1}/{config.steps} loss {loss.item():.3f} "
                + " ".join(f"{n} {a:.2f}" for n, a in accuracy.items())
                + f" ({time.perf_counter() - start:.0f}s)")
    model.eval().requires_grad_(False)
    return model


@torch.no_grad()
def image_features(model: Blip2VisionModel, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """Pooled features (N, hidden) of uint8 images (N, H, W, 3)."""
    chunks = [model(pixel_values(images[i : i + batch_size])).pooler_output
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def linear_probe(model: Blip2VisionModel, train: tuple[np.ndarray, dict[str, torch.Tensor]],
                 evaluate: dict[str, tuple[np.ndarray, dict[str, torch.Tensor]]], steps: int = 300,
                 seed: int = 0) -> dict[str, dict[str, float]]:
    """Fit fresh linear classifiers on frozen pooled features of ``train``; report accuracy per attribute
    (and their mean) on each named held-out set in ``evaluate``."""
    torch.manual_seed(seed)
    features = image_features(model, train[0])
    mean, std = features.mean(0), features.std(0) + 1e-6  # standardise: the probe then trains in few steps
    probe = AttributeHeads(features.shape[1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = probe.loss((features - mean) / std, train[1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    results = {}
    for name, (images, labels) in evaluate.items():
        accuracy = probe.accuracy((image_features(model, images) - mean) / std, labels)
        results[name] = {**accuracy, "mean": float(np.mean(list(accuracy.values())))}
    return results
