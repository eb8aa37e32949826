"""Tiny random-config DiT transformers, inputs and a dense step loop, shared by the model tests."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import DiTTransformer2DModel
from harness import denoise, random_model

IN_CHANNELS = 4
OUT_CHANNELS = 8  # learned sigma, as DiT-XL/2: the noise cache must cover all 8
NUM_CLASSES = 1000  # DiTPipeline's null class is label 1000

# The latent moves with the predicted noise (the first IN_CHANNELS of the output).
run_steps = partial(denoise, channels=IN_CHANNELS)


def tiny_dit(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, sample_size: int = 8):
    return random_model(
        DiTTransformer2DModel, seed, dtype,
        num_attention_heads=2, attention_head_dim=8, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS,
        num_layers=layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
    )


def inputs(batch: int = 2, side: int = 10, seed: int = 1, dtype=torch.float32, device="cpu", cfg: bool = False):
    """cfg=True: DiTPipeline's batch, [cond; null class] with the same latents in both halves."""
    g = torch.Generator().manual_seed(seed)
    if cfg:
        half = torch.randn(batch // 2, IN_CHANNELS, side, side, generator=g)
        hidden = torch.cat([half, half])
        labels = torch.cat([torch.randint(0, NUM_CLASSES, (batch // 2,), generator=g),
                            torch.full((batch // 2,), NUM_CLASSES)])
    else:
        hidden = torch.randn(batch, IN_CHANNELS, side, side, generator=g)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return dict(hidden_states=hidden.to(device, dtype), class_labels=labels.to(device))
