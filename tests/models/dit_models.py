"""Tiny random-config DiT transformers, inputs and a dense step loop, shared by the model tests."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel

IN_CHANNELS = 4
OUT_CHANNELS = 8  # learned sigma, as DiT-XL/2: the noise cache must cover all 8
NUM_CLASSES = 1000  # DiTPipeline's null class is label 1000


def tiny_dit(seed: int = 0, dtype: torch.dtype = torch.float32, layers: int = 2, sample_size: int = 8):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS,
        num_layers=layers, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=NUM_CLASSES,
    )
    # adaLN-zero starts with zero gates: perturb every parameter so each block really mixes
    # tokens and the output depends on all of them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


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


def run_steps(model, kw: dict, steps: int, step_fn=None):
    """A toy denoising loop: the latent moves with the predicted noise so every step differs."""
    x = kw["hidden_states"]
    outs = []
    for i in range(steps):
        t = torch.full((x.shape[0],), 1000.0 * (1 - i / steps), dtype=x.dtype, device=x.device)
        with torch.no_grad():
            out = model(**{**kw, "hidden_states": x}, timestep=t, return_dict=False)[0]
        outs.append(out)
        if step_fn is not None:
            step_fn()
        x = x - 0.1 * out[:, :IN_CHANNELS]
    return outs
