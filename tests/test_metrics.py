import pytest
import torch

from cat_pruning.metrics import psnr, ssim


def test_psnr_and_ssim_behave():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 32, generator=g)
    noisy = (a + 0.05 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    noisier = (a + 0.2 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, noisy) > psnr(a, noisier) > 0
    assert 1.0 > ssim(a, noisy) > ssim(a, noisier)
    # PSNR of a uniform 0.1 offset is exactly 20 dB.
    assert psnr(a * 0.5 + 0.1, a * 0.5) == pytest.approx(20.0)
