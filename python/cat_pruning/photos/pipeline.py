"""PhotoFluxPipeline: a pixel-space Flux-style text-to-image pipeline around the photo model.

The denoising loop has FluxPipeline's shape: the image (B, 3, H, W) in [-1, 1] is packed 2x2 into
(B, H/2 * W/2, 12) tokens (Flux's own packing: channels, then the 2x2 pixels of each token), the
transformer gets ``img_ids`` (0, row, col) per token and all-zero ``txt_ids``, a timestep in
[0, 1] (it scales by 1000 itself), one call per step, one scheduler.step per step. No CFG batch
by default (guidance_scale 1, as Flux.1 schnell/dev run); guidance_scale > 1 runs the batch
[uncond; cond], whose halves CAT then treats as independent samples (the Flux adapter pairs none).
"""

# No `from __future__ import annotations`: diffusers 0.36 reads the __init__ annotations as classes
# to load the components.
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor

from ..tiny.pipeline import SmallPipeline
from ..tiny.text import TinyTextEncoder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
PATCH = 2  # pixels per token side: 64x64 pixels -> 32x32 = 1024 tokens of 3 * 2 * 2 = 12 channels


def pack(x: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p), row-major tokens, channels outermost in a token."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpack(tokens: torch.Tensor, height: int, width: int, p: int = PATCH) -> torch.Tensor:
    """The inverse of pack: (B, N, C * p * p) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    c = d // (p * p)
    return tokens.view(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_ids(rows: int, cols: int, device=None) -> torch.Tensor:
    """Flux's img_ids: (rows * cols, 3) with (0, row, col) per token."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.stack([torch.zeros_like(r), r, c], -1).float()


class PhotoFluxPipeline(SmallPipeline):
    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        text_encoder: TinyTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self._register(transformer, text_encoder, scheduler)

    image_size = 64  # the training resolution

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 28,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images: ``prompt`` one caption or a list ("coffee, close-up"; see
        cat_pruning.photos.all_captions), ``num_inference_steps`` Euler steps (default 28),
        ``guidance_scale`` 1 (default: no CFG batch) or > 1 for classifier-free guidance,
        ``height``/``width`` multiples of 2 (default 64, the training size), ``latents`` the
        starting noise (B, 3, H, W), ``output_type`` "pil", "np" (B, H, W, 3) or "pt" (B, 3, H, W),
        all in [0, 1]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        self._guidance_scale = guidance_scale
        device = self._execution_device
        dtype = self.transformer.dtype
        height = height or self.image_size
        width = width or self.image_size
        if height % PATCH or width % PATCH:
            raise ValueError(f"height and width must be multiples of {PATCH}")

        hidden, pooled = self.encode_prompt(prompts, [""] * len(prompts), device, dtype)
        txt_ids = torch.zeros(hidden.shape[1], 3, device=device)
        img_ids = image_ids(height // PATCH, width // PATCH, device)

        shape = (len(prompts), 3, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)
        x = pack(latents)

        # the transformer scales the timestep by 1000
        x = self._denoise(x, num_inference_steps, guidance_scale, time_divisor=1000, encoder_hidden_states=hidden,
                          pooled_projections=pooled, img_ids=img_ids, txt_ids=txt_ids)
        return self._finish((unpack(x, height, width) / 2 + 0.5).clamp(0, 1), output_type, return_dict)


def load_photo_pipeline(device="cpu", dtype=torch.float32, path: str | Path | None = None) -> PhotoFluxPipeline:
    """Load the shipped photo model (or a pipeline saved by tools/train_photo_model.py at `path`)."""
    pipe = PhotoFluxPipeline.from_pretrained(str(path or WEIGHTS_DIR))  # fp32 on disk
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)
