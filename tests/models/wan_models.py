"""Tiny random-config Wan transformers and their inputs, shared by the Wan tests."""

from __future__ import annotations

from functools import partial

import torch
from diffusers import WanTransformer3DModel
from harness import denoise, random_model

TEXT_TOKENS = 7
TEXT_DIM = 16
IN_CHANNELS = 4

run_steps = partial(denoise, t_max=1000.0)


def tiny_wan(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, **config):
    """2 heads of 12 channels (the 3D rotary splits them 4 / 4 / 4 over frame, row, col)."""
    defaults = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=IN_CHANNELS,
                    out_channels=IN_CHANNELS, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=layers,
                    rope_max_seq_len=32)
    return random_model(WanTransformer3DModel, seed, dtype, **{**defaults, **config})


def inputs(batch: int = 2, frames: int = 3, height: int = 4, width: int = 5, seed: int = 1, dtype=torch.float32,
           device="cpu"):
    """Transformer kwargs for frames x height x width tokens (the latent is twice as high and wide),
    timestep excluded."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, IN_CHANNELS, frames, 2 * height, 2 * width, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, TEXT_DIM, generator=g).to(device, dtype),
    )


def tokens(out: torch.Tensor) -> torch.Tensor:
    """(B, C, F, 2h, 2w) model output -> (B, F*h*w, 4*C) per-token rows in proj_out's layout
    (p_t, p_h, p_w, C)."""
    b, c, f, hh, ww = out.shape
    x = out.view(b, c, f, hh // 2, 2, ww // 2, 2)
    return x.permute(0, 2, 3, 5, 4, 6, 1).reshape(b, f * (hh // 2) * (ww // 2), 4 * c)
