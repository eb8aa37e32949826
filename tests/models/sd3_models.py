"""Tiny random-config SD3 / SD3.5 transformers and a dense step loop, shared by the model tests."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel
from harness import denoise, random_model

TEXT_TOKENS = 7
JOINT_DIM = 24
POOLED_DIM = 20

run_steps = denoise


def tiny_sd3(variant: str = "sd3", seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 3):
    """variant "sd3": plain MM-DiT; "sd35": RMS qk-norm and dual attention in the first block."""
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if variant == "sd35" else {}
    return random_model(
        SD3Transformer2DModel, seed, dtype,
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
        caption_projection_dim=16, pooled_projection_dim=POOLED_DIM, pos_embed_max_size=16, **extra,
    )


def inputs(batch: int = 2, height: int = 12, width: int = 10, seed: int = 1, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, height, width, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, POOLED_DIM, generator=g).to(device, dtype),
    )
