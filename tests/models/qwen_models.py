"""Tiny random-config Qwen-Image transformers and their inputs, shared by the Qwen-Image tests."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import QwenImageTransformer2DModel
from harness import denoise, random_model

TEXT_TOKENS = 7
JOINT_DIM = 24
IN_CHANNELS = 16  # packed 2x2 latent of a 4-channel VAE; the output has as many channels

# Flow-matching timesteps: from 1 towards 0.
run_steps = partial(denoise, t_max=1.0)


def tiny_qwen(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, zero_cond_t: bool = False):
    """zero_cond_t: Qwen-Image-Edit-2511's reference conditioning (reference rows modulated at t = 0)."""
    extra = dict(zero_cond_t=True) if zero_cond_t else {}
    return random_model(
        QwenImageTransformer2DModel, seed, dtype,
        patch_size=2, in_channels=IN_CHANNELS, out_channels=IN_CHANNELS // 4, num_layers=layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM, axes_dims_rope=(2, 2, 4), **extra,
    )


def inputs(batch: int = 2, height: int = 6, width: int = 5, seed: int = 1, dtype=torch.float32, device="cpu",
           padded: bool = True, reference: tuple[tuple[int, int], ...] = ()):
    """Transformer kwargs for a height x width token grid (packed latent), timestep excluded; with
    `padded`, the text of every sample but the first ends in padding (mask 0); `reference`: the
    (height, width) grids of reference images, whose tokens follow the image's (the Edit models)."""
    g = torch.Generator().manual_seed(seed)
    rows = height * width + sum(h * w for h, w in reference)
    mask = torch.ones(batch, TEXT_TOKENS, dtype=torch.bool)
    if padded:
        for i in range(1, batch):
            mask[i, TEXT_TOKENS - 1 - i % (TEXT_TOKENS - 2):] = False
    return dict(
        hidden_states=torch.randn(batch, rows, IN_CHANNELS, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, JOINT_DIM, generator=g).to(device, dtype),
        encoder_hidden_states_mask=mask.to(device),
        img_shapes=[[(1, height, width), *((1, h, w) for h, w in reference)]] * batch,
    )
