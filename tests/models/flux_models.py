"""Tiny random-config Flux transformers and a dense step loop, shared by the Flux model tests."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import FluxTransformer2DModel
from harness import denoise, random_model

from cat_pruning.adapters.flux import image_ids

TEXT_TOKENS = 7
JOINT_DIM = 24
POOLED_DIM = 20
IN_CHANNELS = 16  # packed 2x2 latent of a 4-channel VAE

# Flow-matching timesteps: from 1 towards 0.
run_steps = partial(denoise, t_max=1.0)


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, single_layers: int = 2,
              guidance: bool = True):
    return random_model(
        FluxTransformer2DModel, seed, dtype,
        patch_size=1, in_channels=IN_CHANNELS, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
        pooled_projection_dim=POOLED_DIM, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
    )


def inputs(batch: int = 2, height: int = 6, width: int = 5, seed: int = 1, dtype=torch.float32, device="cpu",
           guidance: bool = True):
    """Transformer kwargs for a height x width token grid (packed latent), timestep excluded."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        hidden_states=torch.randn(batch, height * width, IN_CHANNELS, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, POOLED_DIM, generator=g).to(device, dtype),
        img_ids=image_ids(height, width, device),
        txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device),
    )
    if guidance:
        kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return kw
