"""TinyWanPipeline: a pixel-space text-to-video pipeline around the video model, a diffusers
WanTransformer3DModel.

The denoising loop has WanPipeline's shape: the video (B, 3, F, H, W) in [-1, 1] goes to the
transformer as it is (pixel space: the transformer's 1x2x2 patches are its tokens), with the
timestep in [0, 1000], and classifier-free guidance is two transformer calls per step, one per
branch, inside ``transformer.cache_context("cond")`` / ``("uncond")``, then one scheduler.step.
"""

# No `from __future__ import annotations`: diffusers reads the __init__ annotations as classes to
# load the components.
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..tiny.pipeline import SmallPipeline
from ..tiny.text import TinyTextEncoder
from .clips import FRAMES, SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class VideoOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor  # (B, F, H, W, 3) in [0, 1] ("np"), or (B, 3, F, H, W) ("pt")


class TinyWanPipeline(SmallPipeline):
    def __init__(
        self,
        transformer: WanTransformer3DModel,
        text_encoder: TinyTextEncoder,
        scheduler: FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self._register(transformer, text_encoder, scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 28,
        guidance_scale: float = 4.0,
        negative_prompt: str = "",
        num_frames: int = FRAMES,
        height: int = SIZE,
        width: int = SIZE,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ):
        """Generate clips: ``prompt`` one caption or a list ("a red circle moving left over blue
        stripes"; see cat_pruning.video.clips), ``num_inference_steps`` Euler steps (default 28),
        ``guidance_scale`` (default 4; 1: no guidance, one call per step), ``num_frames``,
        ``height``, ``width`` (default 8 frames of 32x32, the training size; sizes in multiples
        of 2), ``latents`` the starting noise (B, 3, F, H, W), ``output_type`` "np" (B, F, H, W, 3)
        or "pt" (B, 3, F, H, W), in [0, 1]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if height % 2 or width % 2:
            raise ValueError("height and width must be multiples of 2 (the transformer's patches)")
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        self._guidance_scale = guidance_scale
        device = self._execution_device
        dtype = self.transformer.dtype
        cond, _ = self.text_encoder.encode(prompts, device=device)
        uncond, _ = self.text_encoder.encode([negative_prompt] * len(prompts), device=device)
        shape = (len(prompts), 3, num_frames, height, width)
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            x = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                step = t.expand(x.shape[0])
                with self.transformer.cache_context("cond"):
                    noise = self.transformer(hidden_states=x.to(dtype), timestep=step,
                                             encoder_hidden_states=cond.to(dtype), return_dict=False)[0]
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond"):
                        other = self.transformer(hidden_states=x.to(dtype), timestep=step,
                                                 encoder_hidden_states=uncond.to(dtype), return_dict=False)[0]
                    noise = other + guidance_scale * (noise - other)
                x = self.scheduler.step(noise.float(), t, x, return_dict=False)[0]
                progress_bar.update()

        video = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "np":
            video = video.permute(0, 2, 3, 4, 1).cpu().numpy()  # after the loop, not in a step
        self.maybe_free_model_hooks()
        return VideoOutput(frames=video) if return_dict else (video,)


def load_video_pipeline(device="cpu", dtype=torch.float32, path: str | Path | None = None) -> TinyWanPipeline:
    """Load the shipped video model (or a pipeline saved by tools/train_video_model.py at `path`)."""
    pipe = TinyWanPipeline.from_pretrained(str(path or WEIGHTS_DIR))  # fp32 on disk
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)
