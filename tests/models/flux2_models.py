"""Tiny random-config FLUX.2 transformers and their inputs, shared by the FLUX.2 tests."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import Flux2Transformer2DModel
from harness import denoise, random_model

from cat_pruning.adapters.flux2 import image_ids, text_ids

TEXT_TOKENS = 7
JOINT_DIM = 24
IN_CHANNELS = 16

# Flow-matching timesteps: from 1 towards 0.
run_steps = partial(denoise, t_max=1.0)


def tiny_flux2(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, single_layers: int = 2):
    # (guidance-distilled: diffusers before 0.42 has no guidance_embeds switch and always embeds it)
    return random_model(
        Flux2Transformer2DModel, seed, dtype,
        patch_size=1, in_channels=IN_CHANNELS, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM, timestep_guidance_channels=16,
        mlp_ratio=2.0, axes_dims_rope=(2, 2, 2, 2),
    )


def inputs(batch: int = 2, height: int = 6, width: int = 5, seed: int = 1, dtype=torch.float32, device="cpu"):
    """Transformer kwargs for a height x width token grid (packed latent), timestep excluded."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, height * width, IN_CHANNELS, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=g).to(device, dtype),
        img_ids=image_ids(height, width, device),
        txt_ids=text_ids(TEXT_TOKENS, device),
        guidance=torch.full((batch,), 4.0, device=device, dtype=dtype),
    )
