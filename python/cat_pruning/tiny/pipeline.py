"""TinyT2IPipeline: a pixel-space SD3-style text-to-image pipeline around the shipped tiny model.

Same denoising loop shape as diffusers' StableDiffusion3Pipeline: one transformer call per step
on the CFG batch [uncond; cond], one scheduler.step per step, rectified-flow Euler sampling.
"""

# No `from __future__ import annotations`: diffusers 0.36 reads the __init__ annotations as classes
# to load the components.
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .text import TinyTextEncoder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class SmallPipeline(DiffusionPipeline):
    """What the shipped models' pipelines share: the tiny word-level text encoder, guidance, the
    Euler loop over the scheduler's timesteps and the output conversion."""

    model_cpu_offload_seq = "text_encoder->transformer"

    def _register(self, transformer, text_encoder, scheduler) -> None:
        self.register_modules(transformer=transformer, text_encoder=text_encoder, scheduler=scheduler)
        self._guidance_scale = 1.0
        self._num_timesteps = 0

    @property
    def tokenizer(self):
        """The word tokenizer (its vocabulary is stored in the text encoder's config)."""
        return self.text_encoder.tokenizer

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def encode_prompt(self, prompt: list[str], negative_prompt: list[str] | None, device, dtype):
        """(encoder_hidden_states, pooled_projections), with [uncond; cond] when CFG is on."""
        texts = list(prompt)
        if self.do_classifier_free_guidance:
            texts = list(negative_prompt) + texts
        hidden, pooled = self.text_encoder.encode(texts, device=device)
        return hidden.to(dtype), pooled.to(dtype)

    def _denoise(self, x: torch.Tensor, num_inference_steps: int, guidance_scale: float, time_divisor: float = 1,
                 **transformer_kwargs) -> torch.Tensor:
        """Euler steps from noise `x` (fp32; [uncond; cond] batches under CFG), the transformer
        called with its timestep / time_divisor and `transformer_kwargs`."""
        self.scheduler.set_timesteps(num_inference_steps, device=x.device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for t in timesteps:
                model_in = torch.cat([x] * 2) if self.do_classifier_free_guidance else x
                noise_pred = self.transformer(
                    hidden_states=model_in.to(self.transformer.dtype),
                    timestep=(t / time_divisor).expand(model_in.shape[0]),
                    return_dict=False,
                    **transformer_kwargs,
                )[0]
                if self.do_classifier_free_guidance:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + guidance_scale * (cond - uncond)
                x = self.scheduler.step(noise_pred.float(), t, x, return_dict=False)[0]
                progress_bar.update()
        return x

    def _finish(self, image: torch.Tensor, output_type: str, return_dict: bool):
        """(B, 3, H, W) in [0, 1] -> the pipeline output."""
        if output_type == "pt":
            pass
        elif output_type in ("np", "pil"):
            image = image.permute(0, 2, 3, 1).cpu().float().numpy()  # after the loop, not in a step
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        else:
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


class TinyT2IPipeline(SmallPipeline):
    def __init__(
        self,
        transformer: SD3Transformer2DModel,
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
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if negative_prompt is None:
            negative_prompt = ""
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            negs = [n for n in negs for _ in range(num_images_per_prompt)]
        if len(negs) != len(prompts):
            raise ValueError("negative_prompt must be a string or have one entry per prompt")
        self._guidance_scale = guidance_scale

        device = self._execution_device
        dtype = self.transformer.dtype
        cfg = self.transformer.config
        height = height or cfg.sample_size
        width = width or cfg.sample_size
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"height and width must be multiples of patch_size={cfg.patch_size}")

        hidden, pooled = self.encode_prompt(prompts, negs, device, dtype)

        shape = (len(prompts), cfg.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = latents.to(device=device, dtype=torch.float32)

        latents = self._denoise(latents, num_inference_steps, guidance_scale, encoder_hidden_states=hidden,
                                pooled_projections=pooled)
        return self._finish((latents / 2 + 0.5).clamp(0, 1), output_type, return_dict)


def load_tiny_pipeline(device="cpu", dtype=torch.float32, path: str | Path | None = None) -> TinyT2IPipeline:
    """Load the shipped tiny model (or a pipeline saved by tools/train_tiny_t2i.py at `path`)."""
    pipe = TinyT2IPipeline.from_pretrained(str(path or WEIGHTS_DIR))  # fp32 on disk
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def image_grid(images: list, cols: int) -> np.ndarray:
    """Tile HxWx3 arrays (or PIL images) into one uint8 array."""
    arrs = [np.asarray(im) if not isinstance(im, np.ndarray) else im for im in images]
    arrs = [(a * 255).round().astype(np.uint8) if a.dtype != np.uint8 else a for a in arrs]
    h, w, c = arrs[0].shape
    rows = (len(arrs) + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, a in enumerate(arrs):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = a
    return grid
