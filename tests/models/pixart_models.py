"""Tiny random-config PixArt transformers, inputs and a dense step loop, shared by the model tests."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import PixArtTransformer2DModel
from harness import denoise, random_model

TEXT_TOKENS = 6
CAPTION_DIM = 12
IN_CHANNELS = 4
OUT_CHANNELS = 8  # learned sigma, as the real checkpoints: the noise cache must cover all 8

# The latent moves with the predicted noise (the first IN_CHANNELS of the output).
run_steps = partial(denoise, channels=IN_CHANNELS)


def tiny_pixart(variant: str = "sigma", seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2):
    """variant "sigma": no additional conditions; "alpha": resolution / aspect-ratio conditions
    (their embeddings split the hidden size in three, hence 3 heads)."""
    return random_model(
        PixArtTransformer2DModel, seed, dtype,
        num_attention_heads=3, attention_head_dim=8, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS,
        num_layers=layers, cross_attention_dim=24, sample_size=8, patch_size=2, caption_channels=CAPTION_DIM,
        use_additional_conditions=variant == "alpha", norm_num_groups=4,
    )


def inputs(variant: str = "sigma", batch: int = 2, height: int = 12, width: int = 10, seed: int = 1,
           dtype=torch.float32, device="cpu"):
    """The text of each sample is padded after a random length: the (B, T) mask has zeros."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, TEXT_TOKENS + 1, (batch,), generator=g)
    mask = (torch.arange(TEXT_TOKENS)[None] < lengths[:, None]).to(dtype)
    kw = dict(
        hidden_states=torch.randn(batch, IN_CHANNELS, height, width, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, CAPTION_DIM, generator=g).to(device, dtype),
        encoder_attention_mask=mask.to(device),
        added_cond_kwargs=dict(resolution=None, aspect_ratio=None),
    )
    if variant == "alpha":
        kw["added_cond_kwargs"] = dict(
            resolution=torch.tensor([[8.0 * height, 8.0 * width]]).repeat(batch, 1).to(device, dtype),
            aspect_ratio=torch.full((batch, 1), height / width).to(device, dtype),
        )
    return kw
