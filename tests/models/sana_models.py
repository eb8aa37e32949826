"""Tiny random-config Sana transformers and a dense step loop, shared by the Sana model tests."""

from __future__ import annotations

import torch
from diffusers import SanaTransformer2DModel
from harness import denoise, random_model

TEXT_TOKENS = 7
CAPTION_DIM = 12
LATENT_CHANNELS = 4

run_steps = denoise


def tiny_sana(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, patch_size: int = 1):
    return random_model(
        SanaTransformer2DModel, seed, dtype,
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_attention_heads=2, attention_head_dim=8,
        num_layers=layers, num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=CAPTION_DIM, mlp_ratio=2.5, sample_size=8, patch_size=patch_size,
    )


def inputs(batch: int = 2, height: int = 6, width: int = 5, seed: int = 1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, TEXT_TOKENS)
    mask[:, -2:] = 0  # padded text tokens, as the pipeline's Gemma mask has
    return dict(
        hidden_states=torch.randn(batch, LATENT_CHANNELS, height, width, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, CAPTION_DIM, generator=g).to(device, dtype),
        encoder_attention_mask=mask.to(device, dtype),
    )
