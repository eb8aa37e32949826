"""Image similarity of an accelerated image to its dense reference: PSNR and SSIM."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of (C, H, W) or (B, C, H, W) images in [0, data_range]."""
    mse = (image.double() - reference.double()).square().mean()
    return float("inf") if mse == 0 else float(10 * torch.log10(data_range**2 / mse))


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) with a `window`-tap Gaussian window, sigma 1.5,
    constants K1=0.01, K2=0.03, averaged over channels and pixels (valid region only). The window is
    7 by default, not the usual 11, because the shipped model makes 64x64 images."""
    x, y = image.double(), reference.double()
    if x.dim() == 3:
        x, y = x[None], y[None]
    c = x.shape[1]
    coords = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    kernel = g.expand(c, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
